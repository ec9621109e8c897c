fn main() {
    // SAFETY: first thing in main, no other thread yet.
    unsafe { lora_studio::engine::kernels::cpu::configure() };
    std::process::exit(lora_studio::cli::main());
}
