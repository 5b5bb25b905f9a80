"""Coder LLM app: Ray Serve LLM (vLLM) replicas with hot weight reload, and their OpenAI ingress."""
