"""Reading, hashing and atomically writing safetensors files, without torch where possible."""
