"""Masked-diffusion coder LMs (Dream-Coder, DiffuCoder): the transformer, checkpoint loading and the decoding rules.

Dream and DiffuCoder are Qwen2.5-Coder transformers turned bidirectional and trained to
fill [MASK] tokens; position i's logits predict token i+1 (the "shift" of AR-initialised
dLLMs). A response is decoded from `max_tokens` masks in `steps` denoising steps, each
unmasking some positions (`decoding.DllmSequence`). The serving engine runs the steps of
many requests in one packed, non-causal forward (`model.DiffusionLM.forward_packed`).
"""
