"""Model families whose modules record head counts and widths next to their weights: timm, torch's
`nn.MultiheadAttention` and Hugging Face transformers. Each module holds plain sync functions (and the forwards
they install); `wtfront.prune.metadata.BUILTIN_HOOKS` says which module types they run on."""
