"""Our CLIP BPE tokenizer (data/clip_bpe.py) against open_clip's, on varied captions.

Not part of the library or CI (it needs open_clip's tokenizer file and the `regex` package):

    pip download open_clip_torch --no-deps -d /tmp/oc && unzip -o /tmp/oc/open_clip_torch-*.whl \\
        'open_clip/tokenizer.py' 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc
    pip install regex
    python tools/clip_tokenizer_agreement.py /tmp/oc/open_clip

open_clip's ``tokenizer.py`` is loaded as a file (its package ``__init__`` needs torchvision). Prints
how many captions get the same ids, the captions that do not, and tokens per caption for BPE and
the byte-level fallback on the English ones.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
import sys
import unicodedata

ENGLISH = [
    "A photo of a cat sitting on a wooden table.",
    "Two dogs playing in the snow, 4K wallpaper",
    "Vintage 1950's car parked outside a diner — Route 66",
    "Women's running shoes, size 7.5 (US) / 38 (EU)",
    "I'm sure they'll say it's fine; we'd've gone if you'd asked.",
    "IT'S A TRAP!!! Don't LOOK BACK",
    "Stock Photo - Young businessman using laptop at office desk",
    "<b>Beautiful</b> sunset over the ocean &amp; mountains &lt;3",
    "Price: $19.99 — 50% off!! Buy now @ www.example.com/shop?id=123&ref=abc",
    "#travel #nature #photography @john_doe",
    "Curly ‘quotes’ and “double quotes” and don’t",
    "numbers 1234567890 3.14159 1,000,000 -42 +7 0x1F 1e-5",
    "dates 2023-01-15 12:30:45 01/02/03",
    "under_score and hyphen-ated and slash/separated words",
]
VARIED = [
    "Café au lait, crème brûlée et naïveté à Paris", "Straße in München bei Nacht, Größe XXL",
    "東京タワーの夜景 (Tokyo Tower at night)", "北京故宫博物院 一 二 三 四 五 十 百 千 万", "서울의 아름다운 풍경",
    "Москва — столица России, 2019 год", "مدينة دبي في الليل", "नमस्ते दुनिया १२३४",
    "Ελληνικά γράμματα: αβγδε ΑΒΓΔΕ", "Thai ภาษาไทย and Hebrew עברית and Armenian Հայերեն",
    "Mongolian ᠮᠣᠩᠭᠣᠯ and Tibetan བོད་ཡིག and Ethiopic ግዕዝ",
    "Emoji party 🎉🎂🥳👍🏽 👨‍👩‍👧‍👦 ❤️", "mojibake: cafÃ© naÃ¯ve â€œquotedâ€\x9d",
    "Fullwidth ＡＢＣ１２３ and ligatures ﬁ ﬂ ﬀ", "Roman numerals Ⅻ ⅷ and fractions ½ ¾ and superscripts x² y³",
    "Circled ① ② ③ and ⓐ ⓑ Ⓐ", "Tabs\tand\nnewlines\r\nand   multiple    spaces",
    "Control \x1f unit \x1c file separators \x85 next line \u00a0 nbsp \u2028 ls",
    "Zero\u200bwidth\u200dspace and \u200e marks \ufeff BOM", "Decomposed e\u0301 and a\u0308 and o\u0302",
    "Greek ypogegrammeni \u0345 and long s ſ and Kelvin \u212a and dotted İ",
    "''''' \"\"\" ``` ~~~ ... --- ___ *** !!! ???", "", "   ", "x", "'s", "'S 'T 'RE 'VE 'M 'LL 'D",
    "<start_of_text> hello <end_of_text>", "&#x27;single&#x27; &quot;double&quot; &amp;amp; &nbsp;",
    "Math: ∑ ∫ √ ∞ ≠ ≤ ≥ ± × ÷ π", "Currency: € £ ¥ ₹ ₩ ₿ ¢", "Private use \ue000 and a tag \U000e0001",
    "Math bold \U0001d400\U0001d401", "a" * 300, "supercalifragilisticexpialidocious " * 20,
    "the quick brown fox jumps over the lazy dog " * 40,
]
WORDS = ("photo image picture of a the in on with and at by from for beautiful old new red blue green small "
         "large man woman child dog cat car house tree river mountain city street night day sunset beach vintage "
         "modern art design logo illustration vector background texture pattern portrait landscape close-up "
         "view").split()


def captions(seed: int = 0) -> tuple[list[str], list[str]]:
    """(English captions, all captions): hand-written ones, 250 from a word list, 200 random strings over
    the assigned code points of planes 0-2, 4 words of 5,000 letters."""
    rng = random.Random(seed)
    english = list(ENGLISH)
    for _ in range(250):
        caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
        caption = caption.title() if rng.random() < 0.3 else caption
        if rng.random() < 0.3:
            caption += rng.choice([".", "!", ",", " - stock photo", " (2019)", " #art", " | eBay"])
        english.append(caption)
    assigned = [c for c in range(0x20, 0x30000) if unicodedata.category(chr(c)) not in ("Cn", "Cs", "Co")]
    noise = ["".join(chr(rng.choice(assigned)) if rng.random() < 0.7 else rng.choice(" ,.'0a")
                     for _ in range(rng.randint(1, 60))) for _ in range(200)]
    long_words = ["a" * 5000, "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5000)),
                  "photography" * 450,
                  " ".join("".join(rng.choice("etaoinshrdlu") for _ in range(rng.randint(3, 12))) for _ in range(600))]
    return english, english + VARIED + noise + long_words


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("open_clip_dir", help="folder with open_clip's tokenizer.py and its BPE file")
    args = parser.parse_args()
    bpe_file = os.path.join(args.open_clip_dir, "bpe_simple_vocab_16e6.txt.gz")
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer",
                                                  os.path.join(args.open_clip_dir, "tokenizer.py"))
    reference_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference_module)
    reference = reference_module.SimpleTokenizer(bpe_path=bpe_file)

    from internimage.data import Tokenizer
    from internimage.data.caption_sample import caption_token_statistics
    ours = Tokenizer(77, bpe_file)
    english, everything = captions()
    differ = [text for text in everything
              if [token - 3 for token in ours.encode(text)] != reference.encode(text)]
    print(f"same ids: {len(everything) - len(differ)} of {len(everything)} captions "
          f"({sum(len(reference.encode(t)) for t in everything)} tokens)")
    for text in differ:
        print(f"  differs: {text[:70]!r}")
    for name, tokenizer in (("CLIP BPE", ours), ("byte-level", Tokenizer(77))):
        stats = caption_token_statistics(tokenizer, english)
        print(f"{name}: {stats['mean_tokens']:.1f} tokens per English caption, "
              f"{stats['truncated_share']:.0%} cut at 77 ({stats['captions']} captions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
