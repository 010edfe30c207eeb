"""The `duet` family (DuetGen): a Qwen2.5-VL MLLM that writes and emits <BOV>, a Wan or Cosmos
video DiT that draws each image after clean condition frames of the earlier ones."""
