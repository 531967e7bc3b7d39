"""Shared corpus and test strings for the tokenizer fixtures (seeded, deterministic)."""
import random

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you doing today? I'm fine, thanks.",
    "We've been waiting for 42 minutes; it's 3.14 times longer than usual.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 12345 2024-07-26.",
    "Le café est très bon, mais la crème brûlée est meilleure.",
    "Der Bär läuft über die Straße und isst Äpfel.",
    "El niño comió piña en la mañana; ¿quién sabe por qué?",
    "Привет, как дела? Всё хорошо, спасибо.",
    "Γειά σου κόσμε, τι κάνεις σήμερα;",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "日本語の文章を書いています。東京は大きな都市です。",
    "한국어 문장입니다. 서울은 아름다운 도시입니다.",
    "def main():\n    print(\"hello\")\n    return 0\n",
    "fn main() { let x = vec![1, 2, 3]; println!(\"{:?}\", x); }",
    "Emoji time 😀 🎉 👍 ❤️ and more text after them.",
    "Tabs\tand\tnewlines\nare\nwhitespace   too.",
    "https://example.com/search?q=tokenizer&lang=en",
    "They'll say we'd done it, but you're sure they've not.",
    "UPPER CASE AND lower case AND MiXeD CaSe words.",
    "Mathematics: a^2 + b^2 = c^2, and e^(i*pi) + 1 = 0.",
]

TEST_STRINGS = [
    "Hello world",
    "",
    " ",
    "a",
    "  leading spaces",
    "trailing spaces   ",
    "multiple    spaces\tand\ttabs",
    "line1\nline2\n\nline4",
    "\n\n\n",
    "numbers 1234567 and 3.14159 and 2024",
    "punctuation!!! ??? ... ;;; ---",
    "don't I'LL we've THEY'RE she'd",
    "café naïve résumé über",
    "ÀÉÎÕÜ àéîõü ñ ç",
    "emoji 😀🎉👍🏽 ❤️",
    "中文测试：你好，世界！",
    "日本語のテキスト",
    "한국어 텍스트",
    "Привет, мир!",
    "Γειά σου Κόσμε",
    "mixed English和中文 text",
    "code: fn main() { println!(\"hi\"); }",
    "tabs\t\tand\r\nCRLF",
    "https://example.com/path?q=1&r=2",
    "e-mail: someone@example.org",
    "1+1=2; 2*3=6; 10/4=2.5",
    "ALLCAPS lowercase MiXeD",
    "zzzqqqxxx unseen wordsss",
    "ẞ ǅ ﬁ ℌ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "   ",
]


def corpus(n_lines=3000, seed=1234):
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        k = rng.randint(1, 3)
        parts = [rng.choice(SENTENCES) for _ in range(k)]
        if rng.random() < 0.3:
            parts.append(str(rng.randint(0, 10**rng.randint(1, 7))))
        lines.append(" ".join(parts))
    return lines
