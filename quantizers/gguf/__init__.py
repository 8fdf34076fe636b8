"""llama.cpp's quantization: its ggml types (`ggml`), its tools built from source (`tools`), GGUF files (`files`),
their tensor index read without the metadata (`index`) and the `gguf` quantizer, whose levels are llama-quantize's
own blocks (`quantizer`)."""
