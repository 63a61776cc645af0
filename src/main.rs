#![forbid(unsafe_code)]

/// mimalloc: the signing path allocates many small buffers per request (DER, PEM, HTTP/2
/// frames); glibc's allocator cost several percent of server CPU in profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cactl::cli::run()
}
