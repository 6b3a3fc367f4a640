"""The language-model path: text data, a decoder built for integer deployment, QAT, the
two-signature (prefill / decode) export, evaluation and the report (docs/lm.md)."""
