"""Diffusion-LM app (Dream-Coder, DiffuCoder): the step scheduler shell on one device and its OpenAI ingress."""
