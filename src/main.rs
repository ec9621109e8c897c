fn main() {
    std::process::exit(lora_studio::cli::main());
}
