"""Generate the demo's sample data: short-answer SFT chats and preference pairs with exact-match answers.

The answers are single tokens-to-words ("Paris", "42", "APPLE") so exact match is meaningful; the base model
answers in full sentences, so tuning must teach both the format and (for arithmetic) the skill.
Run: python tools/make_sample_data.py  (writes data/sft/{train,valid,test}.jsonl and data/dpo/{train,valid}.jsonl)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Greece": "Athens",
    "Austria": "Vienna",
    "Poland": "Warsaw",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Ireland": "Dublin",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Hungary": "Budapest",
    "Czechia": "Prague",
    "Romania": "Bucharest",
    "Bulgaria": "Sofia",
    "Serbia": "Belgrade",
    "Croatia": "Zagreb",
    "Ukraine": "Kyiv",
    "Turkey": "Ankara",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Syria": "Damascus",
    "Lebanon": "Beirut",
    "Jordan": "Amman",
    "Israel": "Jerusalem",
    "India": "Delhi",
    "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka",
    "Nepal": "Kathmandu",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Indonesia": "Jakarta",
    "Philippines": "Manila",
    "Malaysia": "Kuala Lumpur",
    "Singapore": "Singapore",
    "Mongolia": "Ulaanbaatar",
    "Kenya": "Nairobi",
    "Ethiopia": "Addis Ababa",
    "Nigeria": "Abuja",
    "Ghana": "Accra",
    "Morocco": "Rabat",
    "Algeria": "Algiers",
    "Tunisia": "Tunis",
    "Senegal": "Dakar",
    "Uganda": "Kampala",
    "Zimbabwe": "Harare",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Cuba": "Havana",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Argentina": "Buenos Aires",
    "Colombia": "Bogota",
    "Venezuela": "Caracas",
    "Ecuador": "Quito",
    "Uruguay": "Montevideo",
    "Paraguay": "Asuncion",
    "Bolivia": "Sucre",
    "Australia": "Canberra",
    "New Zealand": "Wellington",
    "Iceland": "Reykjavik",
    "Estonia": "Tallinn",
    "Latvia": "Riga",
    "Lithuania": "Vilnius",
    "Slovakia": "Bratislava",
    "Slovenia": "Ljubljana",
    "Albania": "Tirana",
    "Cyprus": "Nicosia",
    "Qatar": "Doha",
    "Oman": "Muscat",
    "Yemen": "Sanaa",
    "Afghanistan": "Kabul",
    "Cambodia": "Phnom Penh",
    "Laos": "Vientiane",
    "Sudan": "Khartoum",
    "Libya": "Tripoli",
    "Somalia": "Mogadishu",
    "Rwanda": "Kigali",
    "Tanzania": "Dodoma",
    "Zambia": "Lusaka",
    "Angola": "Luanda",
    "Namibia": "Windhoek",
    "Jamaica": "Kingston",
    "Panama": "Panama City",
    "Honduras": "Tegucigalpa",
    "Nicaragua": "Managua",
    "Guatemala": "Guatemala City",
}
WORDS = [
    "apple",
    "river",
    "garden",
    "silver",
    "window",
    "purple",
    "castle",
    "forest",
    "rocket",
    "pencil",
    "bridge",
    "candle",
    "dragon",
    "winter",
    "summer",
    "planet",
    "yellow",
    "orange",
    "guitar",
    "market",
    "island",
    "tiger",
    "cloud",
    "stone",
    "music",
    "bread",
    "chair",
    "light",
    "ocean",
    "paper",
    "sugar",
    "water",
    "horse",
    "money",
    "table",
    "green",
    "night",
    "smile",
    "heart",
    "train",
]
SYSTEM = "Answer with the answer only."


def capital_item(country: str, rng: random.Random) -> tuple[str, str, str]:
    wrong = rng.choice([c for c in CAPITALS.values() if c != CAPITALS[country]])
    return f"What is the capital of {country}?", CAPITALS[country], wrong


def sum_item(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(1, 30), rng.randint(1, 30)
    return f"What is {a} + {b}?", str(a + b), str(a + b + rng.choice([-2, -1, 1, 2, 10]))


def upper_item(word: str) -> tuple[str, str, str]:
    return f"Write the word '{word}' in capital letters.", word.upper(), word.capitalize()


def chat(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def multi_turn(items: list[tuple[str, str, str]]) -> dict:
    messages = [{"role": "system", "content": SYSTEM}]
    for question, answer, _ in items:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def split_items(rng: random.Random) -> dict[str, list[tuple[str, str, str]]]:
    """Disjoint countries and words per split, so held-out answers were never seen in training."""
    countries = sorted(CAPITALS)
    words = list(WORDS)
    rng.shuffle(countries)
    rng.shuffle(words)
    parts = {
        "train": (countries[:60], words[:26]),
        "valid": (countries[60:72], words[26:32]),
        "test": (countries[72:], words[32:]),
    }
    out = {}
    for split, (split_countries, split_words) in parts.items():
        n_sums = {"train": 60, "valid": 12, "test": 16}[split]
        items = [capital_item(c, rng) for c in split_countries] + [upper_item(w) for w in split_words]
        items += [sum_item(rng) for _ in range(n_sums)]
        rng.shuffle(items)
        out[split] = items
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="data", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    splits = split_items(rng)
    out = Path(args.out)
    train = splits["train"]
    sft_train = [chat(q, a) for q, a, _ in train]
    sft_train += [multi_turn(train[i : i + 3]) for i in range(0, 30, 3)]  # every assistant turn supervised
    write_jsonl(out / "sft" / "train.jsonl", sft_train)
    for split in ("valid", "test"):
        write_jsonl(out / "sft" / f"{split}.jsonl", [chat(q, a) for q, a, _ in splits[split]])

    def pair(question: str, good: str, bad: str) -> dict:
        prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        return {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}],
        }

    write_jsonl(out / "dpo" / "train.jsonl", [pair(*item) for item in train])
    write_jsonl(out / "dpo" / "valid.jsonl", [pair(*item) for item in splits["valid"] + splits["test"]])
    print(
        f"wrote {out}/sft (train {len(sft_train)}, valid {len(splits['valid'])}, test {len(splits['test'])}) "
        f"and {out}/dpo (train {len(train)}, valid {len(splits['valid']) + len(splits['test'])})"
    )


if __name__ == "__main__":
    main()
