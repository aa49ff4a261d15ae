//! Every kernel variant the engine compiles, translated by naga (the version wgpu uses)
//! to SPIR-V (Vulkan), MSL (Metal), HLSL (DX12) and GLSL ES 3.1 (GL): a translation error
//! that only a Mac, Windows or GL user would meet shows up here.

use cupbearer::gpu::shaders::{Shaders, NOTES};
use naga::back::{glsl, hlsl, msl, spv};
use naga::ShaderStage::Compute;

/// Translates every compute entry point of `source` with the override `constants`.
fn translate(label: &str, source: &str, constants: &[(String, f64)]) -> Result<usize, String> {
    let fail = |what: &str, e: &dyn std::fmt::Debug| format!("{label}: {what}: {e:?}");
    let module = naga::front::wgsl::parse_str(source).map_err(|e| fail("parse", &e))?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| fail("validate", &e))?;
    let mut pc = naga::back::PipelineConstants::default();
    for (k, v) in constants {
        pc.insert(k.clone(), *v);
    }
    let mut count = 0;
    for ep in &module.entry_points {
        let name = ep.name.clone();
        let what = |backend: &str| format!("{backend} {name}");
        let (m, i) = naga::back::pipeline_constants::process_overrides(
            &module,
            &info,
            Some((Compute, &name)),
            &pc,
        )
        .map_err(|e| fail(&what("overrides"), &e))?;
        let spv_opts = spv::PipelineOptions {
            shader_stage: Compute,
            entry_point: name.clone(),
        };
        spv::write_vec(&m, &i, &spv::Options::default(), Some(&spv_opts))
            .map_err(|e| fail(&what("spir-v"), &e))?;
        let msl_opts = msl::PipelineOptions {
            entry_point: Some((Compute, name.clone())),
            ..Default::default()
        };
        msl::write_string(&m, &i, &msl::Options::default(), &msl_opts)
            .map_err(|e| fail(&what("msl"), &e))?;
        let hlsl_opts = hlsl::PipelineOptions {
            entry_point: Some((Compute, name.clone())),
        };
        let mut text = String::new();
        hlsl::Writer::new(&mut text, &hlsl::Options::default(), &hlsl_opts)
            .write(&m, &i, None)
            .map_err(|e| fail(&what("hlsl"), &e))?;
        let glsl_opts = glsl::Options {
            version: glsl::Version::Embedded {
                version: 310,
                is_webgl: false,
            },
            ..Default::default()
        };
        let glsl_pipeline = glsl::PipelineOptions {
            shader_stage: Compute,
            entry_point: name.clone(),
            multiview: None,
        };
        let mut text = String::new();
        glsl::Writer::new(
            &mut text,
            &m,
            &i,
            &glsl_opts,
            &glsl_pipeline,
            naga::proc::BoundsCheckPolicies::default(),
        )
        .and_then(|mut w| w.write().map(|_| ()))
        .map_err(|e| fail(&what("glsl"), &e))?;
        count += 1;
    }
    Ok(count)
}

#[test]
fn every_kernel_variant_translates_to_every_backend() {
    let shaders = Shaders::builtin();
    let mut translated = 0;
    let mut failures = Vec::new();
    for note in NOTES {
        let source: String = note
            .prepended
            .iter()
            .chain([&note.name])
            .map(|p| shaders.get(p))
            .collect();
        if note.name == "step" || note.name == "rng" {
            continue; // shared parts: no entry point of their own
        }
        let module = naga::front::wgsl::parse_str(&source).unwrap();
        let names: Vec<String> = module
            .overrides
            .iter()
            .filter_map(|(_, o)| o.name.clone())
            .collect();
        // Every override flag off, then on (the engine's variants are combinations).
        for value in [0.0, 1.0] {
            let constants: Vec<(String, f64)> = names.iter().map(|n| (n.clone(), value)).collect();
            match translate(
                &format!("{}.wgsl = {value}", note.name),
                &source,
                &constants,
            ) {
                Ok(n) => translated += n,
                Err(e) => failures.push(e),
            }
        }
    }
    let matmul = shaders.get("matmul");
    // Every block shape the engine generates: 16x16, 32x8 for shared A loads, and 4x4
    // (8x4 with shared A loads) for narrow products.
    let variants = [(16, 4), (32, 2), (4, 1), (8, 1)]
        .into_iter()
        .flat_map(|(bm, bn4)| {
            cupbearer::gpu::matmul::generated_variants(bm, bn4)
                .into_iter()
                .map(move |(label, g, c)| (format!("{bm}x{bn4} {label}"), g, c))
        });
    for (label, generated, constants) in variants {
        match translate(
            &format!("matmul {label}"),
            &format!("{matmul}\n{generated}"),
            &constants,
        ) {
            Ok(n) => translated += n,
            Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{translated} entry points translated to SPIR-V, MSL, HLSL and GLSL");
    assert!(
        translated > 250,
        "only {translated} entry points translated"
    );
}
