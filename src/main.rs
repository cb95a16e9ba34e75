//! The `tenso` binary: argv → the daemon or one admin command. Nothing else.

fn main() -> std::process::ExitCode {
    tenso::cli::main()
}
