"""Write a tiny, randomly initialised BLOOM checkpoint for offline tests and demos.

    python -m worker.model.tiny DIR

The weights are random, so the text is gibberish, but the checkpoint has the real BLOOM architecture
(ALiBi, embedding LayerNorm, tied head), a byte-level BPE tokenizer trained on multilingual text, and
loads with ``from_pretrained`` like any hub checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# BLOOM's own special tokens, at BLOOM's own ids (unk 0, bos 1, eos 2, pad 3).
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

CORPUS = [
    "Once upon a time there was a little robot who wanted to write stories.",
    "This is a creative story about a dragon who learned to bake bread.",
    "The quick brown fox jumps over the lazy dog. The dog did not mind.",
    "Il était une fois un petit chat qui aimait la musique et le soleil.",
    "Érase una vez una niña que vivía cerca del mar y soñaba con volar.",
    "Era uma vez um menino que gostava de ler livros debaixo da árvore.",
    "从前有一座山，山里有一座庙，庙里有一个老和尚在讲故事。",
    "我们今天学习机器学习和自然语言处理，生成文本需要耐心。",
    "كان يا ما كان في قديم الزمان رجل حكيم يحب القراءة والكتابة.",
    "اللغة العربية تكتب من اليمين إلى اليسار وهي جميلة جدا.",
    "एक समय की बात है, एक छोटा सा गाँव था जहाँ लोग खुश रहते थे।",
    "Ngày xửa ngày xưa có một cô bé sống trong một ngôi làng nhỏ.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "function greet(name) {\n  return `Hello, ${name}!`;\n}\nconsole.log(greet('world'));\n",
    "SELECT id, name FROM users WHERE created_at > NOW() - INTERVAL '1 day';",
    "#include <stdio.h>\nint main(void) { printf(\"hello\\n\"); return 0; }\n",
]


def build_tokenizer(vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer on the small multilingual corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
    )


def build_tiny_bloom(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    init_std: float = 0.5,
    seed: int = 0,
    vocab_size: int | None = None,
) -> Path:
    """Save a random BLOOM and its tokenizer to ``out_dir`` and return the path.

    ``vocab_size`` (default: the tokenizer's) can be larger than the tokenizer, to get a real BLOOM shape
    (250880) for benchmarks; ids the tokenizer does not know decode to nothing.
    """
    import torch
    from transformers import BloomConfig, BloomForCausalLM, GenerationConfig

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    config = BloomConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        n_layer=n_layer,
        n_head=n_head,
        # The default init (0.02) makes a random model repeat one token forever; a wide init gives
        # varied greedy output, so equality tests between two code paths mean something.
        initializer_range=init_std,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = BloomForCausalLM(config).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.model.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write the checkpoint into")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, help="model vocabulary (default: the tokenizer's)")
    parser.add_argument("--init-std", type=float, default=0.5, help="weight init std (0.5 gives varied text)")
    args = parser.parse_args(argv)
    path = build_tiny_bloom(
        args.out_dir,
        hidden_size=args.hidden_size,
        n_layer=args.layers,
        n_head=args.heads,
        seed=args.seed,
        vocab_size=args.vocab_size,
        init_std=args.init_std,
    )
    print(f"wrote a tiny BLOOM checkpoint to {path}")
    print(f"try it: BLOOMQ_MODEL={path} make run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
