"""llama.cpp's quantization: its ggml types (`ggml`), its tools built from source (`tools`), GGUF files (`files`) and
the `gguf` quantizer, whose levels are llama-quantize's own blocks (`quantizer`)."""
