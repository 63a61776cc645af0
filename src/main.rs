#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    cactl::cli::run()
}
