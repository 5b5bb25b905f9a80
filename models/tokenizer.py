"""A small BPE tokenizer generated locally, for the tiny random-weight models.

No tokenizer can be downloaded here, so the tiny variants train a byte-level BPE
on a fixed built-in corpus in about a second. Training is deterministic, so every
process that builds it gets the same vocabulary. Ids follow T5's convention
(pad=0, eos=1, unk=2), which the tiny T5/UMT5/CLIP configs rely on.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
TINY_VOCAB_SIZE = 512

_CORPUS_WORDS = (
    "a an the of in on at with and or under over above beside through into from "
    "cat dog bird fish horse robot astronaut city forest ocean river mountain desert "
    "sky cloud sun moon star rain snow fire light shadow street car train boat ship "
    "red green blue yellow purple orange black white golden silver bright dark "
    "running flying walking dancing swimming jumping falling spinning glowing "
    "slow fast tiny huge old new quiet loud calm wild cinematic realistic painting "
    "video image photo shot camera pan zoom close wide aerial night day morning "
    "sunset sunrise winter summer spring autumn portrait landscape detailed"
).split()


def _corpus() -> list[str]:
    words = _CORPUS_WORDS
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(400)]


def train_bpe_tokenizer(corpus: list[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of `vocab_size` tokens trained on `corpus` (deterministic), wrapped for diffusers pipelines."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, tokenizer.token_to_id(EOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=model_max_length,
    )


@lru_cache(maxsize=4)
def build_tiny_tokenizer(model_max_length: int = 77) -> PreTrainedTokenizerFast:
    """The tiny random models' tokenizer (cached per process): the BPE trained on the built-in corpus."""
    return train_bpe_tokenizer(_corpus(), TINY_VOCAB_SIZE, model_max_length)
