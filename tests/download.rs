//! Tests of `cupbearer::data::download` against a tiny local HTTP server (never the
//! network), and of the data dir and mirror environment variables.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};

use common::fixtures::{assert_cifar, cifar_batches, err_text, gz, idx_images_bytes};
use cupbearer::data::{cifar, download, resolve_data_dir, Dataset, DatasetName, Split};
use sha2::{Digest, Sha256};

/// Serves files under `root` over HTTP/1.1 on 127.0.0.1 (404 for anything else, one
/// thread per connection, `Connection: close`); returns the base URL. The server thread
/// lives until the test process exits.
fn serve(root: PathBuf) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let root = root.clone();
            std::thread::spawn(move || handle(stream, &root));
        }
    });
    base
}

fn handle(mut stream: TcpStream, root: &Path) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/");
    let safe = path.split('/').all(|seg| seg != "..");
    let file = root.join(path.trim_start_matches('/'));
    let (status, body) = match std::fs::read(&file) {
        Ok(body) if safe && file.is_file() => ("200 OK", body),
        _ => ("404 Not Found", b"not found".to_vec()),
    };
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream
        .write_all(header.as_bytes())
        .and_then(|()| stream.write_all(&body));
}

/// A URL on which nothing listens (connection refused).
fn refused_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}/", listener.local_addr().unwrap())
}

/// A server root with `bad/` (a valid gz of the wrong data) and `corrupt/` (not gzip data).
fn bad_mirrors() -> (tempfile::TempDir, String) {
    let root = tempfile::tempdir().unwrap();
    for (sub, bytes) in [
        ("bad", gz(&idx_images_bytes(3))),
        ("corrupt", vec![0x1f, 0x8b, 8, 0, 9, 9, 9]),
    ] {
        std::fs::create_dir(root.path().join(sub)).unwrap();
        std::fs::write(
            root.path().join(sub).join("train-images-idx3-ubyte.gz"),
            bytes,
        )
        .unwrap();
    }
    let base = serve(root.path().to_path_buf());
    (root, base)
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

#[test]
fn download_real_mnist_with_fallback_mirror() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if !shared.join("mnist").is_dir() {
        eprintln!("skipped: {} not found", shared.display());
        return;
    }
    let base = serve(shared);
    let data = tempfile::tempdir().unwrap();
    let mirrors = vec![format!("{base}/missing/"), format!("{base}/mnist")]; // no trailing '/'
    let dir = download::download(DatasetName::Mnist, data.path(), &mirrors).unwrap();
    assert_eq!(dir, data.path().join("mnist"));
    let expected: Vec<String> = ["t10k-images", "t10k-labels", "train-images", "train-labels"]
        .iter()
        .map(|f| {
            format!(
                "{f}-idx{}-ubyte.gz",
                if f.ends_with("images") { 3 } else { 1 }
            )
        })
        .collect();
    assert_eq!(dir_entries(&dir), expected);
    let train = Dataset::load(DatasetName::Mnist, Split::Train, data.path()).unwrap();
    let test = Dataset::load(DatasetName::Mnist, Split::Test, data.path()).unwrap();
    assert_eq!(
        (train.len(), test.len(), train.height, train.width),
        (60_000, 10_000, 28, 28)
    );

    // Everything verified is skipped: a mirror list that cannot serve anything still works.
    download::download(DatasetName::Mnist, data.path(), &[refused_url()]).unwrap();

    // A corrupted local file is replaced by a verified download.
    let labels = dir.join("t10k-labels-idx1-ubyte.gz");
    std::fs::write(&labels, gz(b"not the labels")).unwrap();
    download::download(DatasetName::Mnist, data.path(), &mirrors[1..]).unwrap();
    assert_eq!(
        Dataset::load(DatasetName::Mnist, Split::Test, data.path())
            .unwrap()
            .labels,
        test.labels
    );
    assert_eq!(dir_entries(&dir), expected);
}

#[test]
fn download_bad_hash_leaves_nothing_behind() {
    let (_root, base) = bad_mirrors();
    let url = format!("{base}/bad/train-images-idx3-ubyte.gz");

    let fresh = tempfile::tempdir().unwrap();
    let msg = err_text(download::download(
        DatasetName::Mnist,
        fresh.path(),
        &[format!("{base}/bad/")],
    ));
    assert!(
        msg.contains("SHA-256 mismatch") && msg.contains(&url),
        "{msg}"
    );
    assert!(
        msg.contains("ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        "{msg}"
    );
    assert_eq!(
        dir_entries(&fresh.path().join("mnist")),
        Vec::<String>::new()
    );

    // An existing dir keeps its other contents, and gains nothing.
    let existing = tempfile::tempdir().unwrap();
    std::fs::create_dir(existing.path().join("mnist")).unwrap();
    std::fs::write(existing.path().join("mnist/notes.txt"), "mine").unwrap();
    let msg = err_text(download::download(
        DatasetName::Mnist,
        existing.path(),
        &[format!("{base}/bad/")],
    ));
    assert!(msg.contains("SHA-256 mismatch"), "{msg}");
    assert_eq!(dir_entries(&existing.path().join("mnist")), ["notes.txt"]);
}

#[test]
fn download_reports_every_mirror_failure() {
    let (_root, base) = bad_mirrors();
    let refused = refused_url();
    let mirrors = vec![
        format!("{base}/missing/"),
        refused.clone(),
        format!("{base}/corrupt/"),
        format!("{base}/bad/"),
    ];
    let data = tempfile::tempdir().unwrap();
    let msg = err_text(download::download(
        DatasetName::FashionMnist,
        data.path(),
        &mirrors,
    ));
    for part in [
        format!("{base}/missing/train-images-idx3-ubyte.gz: http status: 404"),
        format!("{refused}train-images-idx3-ubyte.gz"),
        format!("{base}/corrupt/train-images-idx3-ubyte.gz: corrupt gzip"),
        format!("{base}/bad/train-images-idx3-ubyte.gz: SHA-256 mismatch"),
    ] {
        assert!(msg.contains(&part), "missing '{part}' in: {msg}");
    }
    assert_eq!(
        dir_entries(&data.path().join("fashion_mnist")),
        Vec::<String>::new()
    );
}

#[test]
fn download_refuses_to_shadow_a_bad_uncompressed_file() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("mnist");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("train-images-idx3-ubyte"), idx_images_bytes(2)).unwrap();
    let msg = err_text(download::download(
        DatasetName::Mnist,
        data.path(),
        &[refused_url()],
    ));
    assert!(
        msg.contains("train-images-idx3-ubyte") && msg.contains("remove it"),
        "{msg}"
    );
    assert_eq!(dir_entries(&dir), ["train-images-idx3-ubyte"]);
}

#[test]
fn default_mirrors_are_https_or_known() {
    let m = download::default_mirrors(DatasetName::Mnist);
    assert_eq!(m[0], "https://ossci-datasets.s3.amazonaws.com/mnist/");
    let f = download::default_mirrors(DatasetName::FashionMnist);
    assert_eq!(f.len(), 2);
    let c = download::default_mirrors(DatasetName::Cifar10);
    assert_eq!(c, ["https://www.cs.toronto.edu/~kriz/"]);
    assert!(m.iter().chain(&f).chain(&c).all(|u| u.ends_with('/')));
    // The real digests cover exactly the files the loader reads.
    let mut files: Vec<&str> = [Split::Train, Split::Test]
        .iter()
        .flat_map(|&s| cifar::file_names(s).iter().copied())
        .collect();
    files.sort();
    let mut hashed: Vec<&str> = download::CIFAR10_SHA256.iter().map(|(f, _)| *f).collect();
    hashed.sort();
    assert_eq!(files, hashed);
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Archive members, `(path, bytes)`.
type Members = Vec<(String, Vec<u8>)>;
/// `(file name, hex SHA-256)`.
type Digests = Vec<(String, String)>;

/// A tar archive of `(path, bytes)` members. Headers are written by hand so that a path
/// the `tar` crate's builder would refuse (`..`) can be tested too.
fn tar_bytes(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, bytes) in members {
        let mut header = tar::Header::new_gnu();
        header.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, bytes.as_slice()).unwrap();
    }
    builder.into_inner().unwrap()
}

/// The members of a generated `cifar-10-binary.tar.gz` (7 train records over the five
/// train files, 3 test records, plus a file that is not extracted) and their digests.
fn cifar_members() -> (Members, Digests) {
    let mut members = Vec::new();
    for (split, counts, first) in [
        (Split::Train, &[2, 1, 0, 3, 1][..], 0),
        (Split::Test, &[3][..], 100),
    ] {
        for (name, bytes) in cifar::file_names(split)
            .iter()
            .zip(cifar_batches(counts, first))
        {
            members.push((format!("cifar-10-batches-bin/{name}"), bytes));
        }
    }
    let hashes = members
        .iter()
        .map(|(p, b)| (p.rsplit('/').next().unwrap().to_string(), sha256_hex(b)))
        .collect();
    members.push((
        "cifar-10-batches-bin/batches.meta.txt".to_string(),
        b"airplane\nautomobile\n".to_vec(),
    ));
    (members, hashes)
}

fn as_refs(hashes: &[(String, String)]) -> Vec<(&str, &str)> {
    hashes
        .iter()
        .map(|(f, h)| (f.as_str(), h.as_str()))
        .collect()
}

/// Serves `cifar-10-binary.tar.gz` variants from subfolders: `good/` (the generated
/// archive), `plain/` (the same, not gzipped: what a server's `Content-Encoding: gzip`
/// leaves), `traversal/` (plus a `..` member), `incomplete/` (no `test_batch.bin`) and
/// `garbage/`. Returns the server root, its base URL and the generated digests.
fn cifar_server() -> (tempfile::TempDir, String, Digests) {
    let (members, hashes) = cifar_members();
    let mut traversal = members.clone();
    traversal.push((
        "cifar-10-batches-bin/../../evil.bin".to_string(),
        b"x".to_vec(),
    ));
    let incomplete: Vec<_> = members
        .iter()
        .filter(|(p, _)| !p.ends_with("test_batch.bin"))
        .cloned()
        .collect();
    let root = tempfile::tempdir().unwrap();
    for (sub, bytes) in [
        ("good", gz(&tar_bytes(&members))),
        ("plain", tar_bytes(&members)),
        ("traversal", gz(&tar_bytes(&traversal))),
        ("incomplete", gz(&tar_bytes(&incomplete))),
        ("garbage", gz(&[7u8; 2000])),
    ] {
        std::fs::create_dir(root.path().join(sub)).unwrap();
        std::fs::write(root.path().join(sub).join("cifar-10-binary.tar.gz"), bytes).unwrap();
    }
    let base = serve(root.path().to_path_buf());
    (root, base, hashes)
}

const CIFAR_FILES: [&str; 6] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
];

#[test]
fn download_cifar10_generated_archive() {
    let (_root, base, hashes) = cifar_server();
    let hashes = as_refs(&hashes);
    for sub in ["good", "plain"] {
        let data = tempfile::tempdir().unwrap();
        let mirrors = vec![format!("{base}/missing/"), format!("{base}/{sub}")];
        let dir = download::download_cifar10(data.path(), &mirrors, &hashes).unwrap();
        assert_eq!(dir, data.path().join("cifar10/cifar-10-batches-bin"));
        // Only the verified files, and no temporary directory, are left.
        assert_eq!(dir_entries(&dir), CIFAR_FILES);
        assert_eq!(
            dir_entries(&data.path().join("cifar10")),
            ["cifar-10-batches-bin"]
        );
        let train = Dataset::load(DatasetName::Cifar10, Split::Train, data.path()).unwrap();
        assert_cifar(&train, 0, 7);
        let test = Dataset::load(DatasetName::Cifar10, Split::Test, data.path()).unwrap();
        assert_cifar(&test, 100, 3);
    }

    let data = tempfile::tempdir().unwrap();
    let good = vec![format!("{base}/good/")];
    let dir = download::download_cifar10(data.path(), &good, &hashes).unwrap();
    // Everything verified is skipped: a mirror that cannot serve anything still works.
    download::download_cifar10(data.path(), &[refused_url()], &hashes).unwrap();

    // A corrupted file is replaced; the user's own files stay.
    std::fs::write(dir.join("data_batch_2.bin"), b"not a batch").unwrap();
    std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
    let msg = err_text(download::download_cifar10(
        data.path(),
        &[refused_url()],
        &hashes,
    ));
    assert!(msg.contains("cifar-10-binary.tar.gz"), "{msg}");
    download::download_cifar10(data.path(), &good, &hashes).unwrap();
    let mut expected = CIFAR_FILES.to_vec();
    expected.push("notes.txt");
    expected.sort();
    assert_eq!(dir_entries(&dir), expected);
    let train = Dataset::load(DatasetName::Cifar10, Split::Train, data.path()).unwrap();
    assert_cifar(&train, 0, 7);
    assert_eq!(
        dir_entries(&data.path().join("cifar10")),
        ["cifar-10-batches-bin"]
    );
}

#[test]
fn download_cifar10_bad_checksum_leaves_nothing_behind() {
    let (_root, base, hashes) = cifar_server();
    let url = format!("{base}/good/cifar-10-binary.tar.gz");
    let mirrors = [format!("{base}/good/")];

    // The real digests (via `download`) reject the generated archive at its first file.
    let fresh = tempfile::tempdir().unwrap();
    let msg = err_text(download::download(
        DatasetName::Cifar10,
        fresh.path(),
        &mirrors,
    ));
    for part in [
        url.as_str(),
        "cifar-10-batches-bin/data_batch_1.bin: SHA-256 mismatch",
        "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5",
        &hashes[0].1,
    ] {
        assert!(msg.contains(part), "missing '{part}' in: {msg}");
    }
    assert_eq!(dir_entries(fresh.path()), Vec::<String>::new());

    // A mismatch on the last file, after five were extracted, leaves nothing either; an
    // existing directory keeps its other contents.
    let mut wrong = hashes.clone();
    wrong[5].1 = "0".repeat(64);
    let existing = tempfile::tempdir().unwrap();
    std::fs::create_dir(existing.path().join("cifar10")).unwrap();
    std::fs::write(existing.path().join("cifar10/notes.txt"), "mine").unwrap();
    for data in [fresh.path(), existing.path()] {
        let msg = err_text(download::download_cifar10(data, &mirrors, &as_refs(&wrong)));
        assert!(
            msg.contains("test_batch.bin: SHA-256 mismatch") && msg.contains(&hashes[5].1),
            "{msg}"
        );
    }
    assert_eq!(dir_entries(fresh.path()), Vec::<String>::new());
    assert_eq!(dir_entries(&existing.path().join("cifar10")), ["notes.txt"]);
}

#[test]
fn download_cifar10_reports_every_mirror_failure() {
    let (_root, base, hashes) = cifar_server();
    let refused = refused_url();
    let mirrors: Vec<String> = ["missing", "traversal", "incomplete", "garbage"]
        .iter()
        .map(|sub| format!("{base}/{sub}/"))
        .chain([refused.clone()])
        .collect();
    let data = tempfile::tempdir().unwrap();
    let msg = err_text(download::download_cifar10(
        data.path(),
        &mirrors,
        &as_refs(&hashes),
    ));
    for part in [
        format!("{base}/missing/cifar-10-binary.tar.gz: http status: 404"),
        format!(
            "{base}/traversal/cifar-10-binary.tar.gz: refusing archive member cifar-10-batches-bin/../../evil.bin"
        ),
        format!(
            "{base}/incomplete/cifar-10-binary.tar.gz: archive lacks cifar-10-batches-bin/test_batch.bin"
        ),
        format!("{base}/garbage/cifar-10-binary.tar.gz"),
        format!("{refused}cifar-10-binary.tar.gz"),
        "CUPBEARER_MIRROR".to_string(),
    ] {
        assert!(msg.contains(&part), "missing '{part}' in: {msg}");
    }
    assert_eq!(dir_entries(data.path()), Vec::<String>::new());
}

/// All assertions that touch process-global env vars live here, since tests run in
/// parallel threads; no other test reads these vars (downloads elsewhere pass mirrors).
#[test]
fn env_precedence() {
    std::env::remove_var("CUPBEARER_DATA_DIR");
    assert_eq!(resolve_data_dir(None), PathBuf::from("data"));
    std::env::set_var("CUPBEARER_DATA_DIR", "/from/env");
    assert_eq!(resolve_data_dir(None), PathBuf::from("/from/env"));
    assert_eq!(
        resolve_data_dir(Some(Path::new("/from/flag"))),
        PathBuf::from("/from/flag")
    );
    std::env::set_var("CUPBEARER_DATA_DIR", "");
    assert_eq!(resolve_data_dir(None), PathBuf::from("data"));
    std::env::remove_var("CUPBEARER_DATA_DIR");

    // CUPBEARER_MIRROR replaces the defaults; explicit mirrors beat it.
    let (_root, base) = bad_mirrors();
    let data = tempfile::tempdir().unwrap();
    std::env::set_var("CUPBEARER_MIRROR", format!("{base}/bad/"));
    let msg = err_text(download::download(DatasetName::Mnist, data.path(), &[]));
    assert!(
        msg.contains(&format!("{base}/bad/train-images-idx3-ubyte.gz")),
        "{msg}"
    );
    assert!(!msg.contains("amazonaws"), "{msg}");
    let msg = err_text(download::download(
        DatasetName::Mnist,
        data.path(),
        &[format!("{base}/corrupt/")],
    ));
    assert!(msg.contains("/corrupt/") && !msg.contains("/bad/"), "{msg}");

    // ... for CIFAR-10 too.
    let (_cifar_root, cifar_base, hashes) = cifar_server();
    std::env::set_var("CUPBEARER_MIRROR", format!("{cifar_base}/good"));
    let dir = download::download_cifar10(data.path(), &[], &as_refs(&hashes)).unwrap();
    assert_eq!(dir_entries(&dir), CIFAR_FILES);
    std::env::remove_var("CUPBEARER_MIRROR");
}
