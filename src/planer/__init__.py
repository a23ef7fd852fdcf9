"""planer: latency-aware sparsely activated Transformers (PLANER) for your own hardware."""

__version__ = "0.1.0"


def load(run_dir, device="cpu"):
    """A checkpoint's model, in eval mode on ``device``, and its tokenizer (``tokenize``, ``encode``, ``decode``).

    >>> model, vocab = planer.load("runs/demo/baseline")
    >>> ids = vocab.encode(vocab.tokenize("ROMEO:"))[0].tolist()
    """
    from planer.io.checkpoint import load_checkpoint

    model, _, vocab = load_checkpoint(run_dir, device)
    return model.eval(), vocab
