fn main() -> std::process::ExitCode {
    cupbearer::cli::main()
}
