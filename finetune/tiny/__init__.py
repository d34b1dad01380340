"""The embedded demo: the tiny SD-architecture models built in code (`builder`) with an offline CLIP
tokenizer (`vocab`), the drawn scenes of the bundled datasets (`scenes`), and the pixel metrics
that read colour, shape and style from samples (`metrics`, `control_metrics`). Used by
`model=tiny_random`, scripts/ and tests/; nothing in the library depends on it."""
