fn main() {
    // SAFETY: first thing in main, no other thread yet.
    unsafe { lora_studio::engine::threads::configure() };
    std::process::exit(lora_studio::cli::main());
}
