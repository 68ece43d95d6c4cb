"""Template-generated text-classification tasks for the MiniLM testbed.

Each task has an in-distribution generator and a shifted one (``ood=True``) that uses held-out
templates and vocabulary, so OOD accuracy measures transfer rather than memorised words.
Tasks are built so that word identity alone does not decide the label (negation, distractor
topics, word order), which is what makes fine-tuning beat a linear probe by a clear margin.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

Row = dict[str, object]


@dataclass(frozen=True)
class TextTask:
    name: str
    labels: tuple[str, ...]
    make: Callable[[random.Random, bool], Row]


# --- sentiment with negation: label = polarity(adjective) XOR negated ---------------------
_SENT = {
    False: {
        "subjects": ["the movie", "the food", "the service", "the hotel", "the book",
                     "the concert", "the app", "the game", "the room", "the trip"],
        "pos": ["good", "great", "excellent", "wonderful", "enjoyable", "pleasant", "fantastic"],
        "neg": ["bad", "terrible", "awful", "boring", "disappointing", "poor", "horrible"],
        "negators": ["not", "not at all", "never"],
        "templates": ["{s} was {n}{a}.", "i thought {s} was {n}{a}.", "honestly, {s} is {n}{a}.",
                      "{s} was {n}{a} overall.", "we all agreed that {s} was {n}{a}."],
    },
    True: {
        "subjects": ["the restaurant", "the lecture", "the flight", "the museum", "the phone",
                     "the play", "the course"],
        "pos": ["superb", "delightful", "brilliant", "lovely", "impressive"],
        "neg": ["dreadful", "mediocre", "unpleasant", "dull", "tedious"],
        "negators": ["hardly", "in no way", "far from"],
        "templates": ["my friends said {s} was {n}{a}", "to be fair, {s} turned out {n}{a}",
                      "according to the review {s} is {n}{a}"],
    },
}


def sentiment(rng: random.Random, ood: bool = False) -> Row:
    v = _SENT[ood]
    positive = rng.random() < 0.5
    negated = rng.random() < 0.5
    adj = rng.choice(v["pos"] if positive else v["neg"])
    neg = rng.choice(v["negators"]) + " " if negated else ""
    text = rng.choice(v["templates"]).format(s=rng.choice(v["subjects"]), n=neg, a=adj)
    return {"text": text, "label": int(positive != negated)}


# --- topic with a distractor from another topic ------------------------------------------
_TOPICS = ("sports", "food", "technology", "weather")
_TOPIC = {
    False: {
        "keywords": [
            ["football", "tennis", "the referee", "the tournament", "the goalkeeper", "a marathon"],
            ["pasta", "the recipe", "a bakery", "the chef", "spicy soup", "dessert"],
            ["the laptop", "a software update", "the processor", "a smartphone", "the database",
             "the wifi"],
            ["the forecast", "heavy rain", "a thunderstorm", "the humidity", "snowfall",
             "a heatwave"],
        ],
        "plain": ["we spent the evening discussing {k}.", "the article was mostly about {k}.",
                  "everyone was talking about {k} today."],
        "distracted": ["apart from a word on {d}, we mostly discussed {k}.",
                       "the article mentions {d} once but is really about {k}."],
    },
    True: {
        "keywords": [
            ["the stadium", "a penalty kick", "the olympics", "cycling"],
            ["the oven", "a sandwich", "the menu", "grilled salmon"],
            ["a keyboard", "the router", "an operating system", "cloud storage"],
            ["the fog", "a blizzard", "the temperature", "strong winds"],
        ],
        "plain": ["i read a long post about {k} this morning",
                  "my neighbour would not stop mentioning {k}"],
        "distracted": ["setting {d} aside, the talk focused on {k}",
                       "besides a quick note about {d}, the podcast covered {k}"],
    },
}


def topic(rng: random.Random, ood: bool = False) -> Row:
    v = _TOPIC[ood]
    label = rng.randrange(len(_TOPICS))
    keyword = rng.choice(v["keywords"][label])
    if rng.random() < 0.5:
        other = rng.choice([t for t in range(len(_TOPICS)) if t != label])
        text = rng.choice(v["distracted"]).format(d=rng.choice(v["keywords"][other]), k=keyword)
    else:
        text = rng.choice(v["plain"]).format(k=keyword)
    return {"text": text, "label": label}


# --- question vs statement: the same words, only the order differs (no punctuation) --------
_QS = {
    False: {
        "subjects": ["you", "we", "they", "i"],
        "aux": ["can", "will", "should", "could", "would", "did", "do"],
        "predicates": ["open the window", "finish the report", "call the doctor",
                       "bring the tickets", "fix the car", "water the plants", "pay the bill"],
        "tails": ["", " today", " tomorrow", " after lunch"],
    },
    True: {
        "subjects": ["he", "she", "the manager", "your sister"],
        "aux": ["might", "must", "shall", "does", "has"],
        "predicates": ["sign the contract", "visit the museum", "clean the kitchen",
                       "answer the email", "move the boxes"],
        "tails": ["", " tonight", " next week"],
    },
}


def question(rng: random.Random, ood: bool = False) -> Row:
    v = _QS[ood]
    subj, aux = rng.choice(v["subjects"]), rng.choice(v["aux"])
    rest = rng.choice(v["predicates"]) + rng.choice(v["tails"])
    is_question = rng.random() < 0.5
    # Grammar is approximate on purpose ("does you ..."): word order is the only signal.
    text = f"{aux} {subj} {rest}" if is_question else f"{subj} {aux} {rest}"
    return {"text": text, "label": int(is_question)}


# --- formality: the register of the request decides, greetings and sign-offs are noise ------
_FORMAL = {
    False: {
        "actions": ["send the report", "check the schedule", "call the client", "book a room",
                    "review my draft", "confirm the order", "share the slides"],
        "formal": ["i would be grateful if you could {a}", "would you kindly {a}",
                   "i respectfully request that you {a}"],
        "informal": ["can u {a}", "gonna need u to {a}", "just {a} already"],
        "openers": ["dear colleague,", "hey,", "good morning,", "yo,", ""],
        "closers": ["kind regards.", "thx!", "sincerely.", "lol", ""],
    },
    True: {
        "actions": ["update the spreadsheet", "reserve a table", "print the invoices",
                    "email the supplier"],
        "formal": ["we would appreciate it if you were able to {a}",
                   "you are requested to {a} at the earliest opportunity"],
        "informal": ["mind if u {a} real quick", "pls {a} when u get a sec"],
        "openers": ["to whom it may concern:", "sup", "greetings,", "oi,"],
        "closers": ["yours faithfully", "cheers mate", "respectfully", "ta"],
    },
}


def formality(rng: random.Random, ood: bool = False) -> Row:
    v = _FORMAL[ood]
    formal = rng.random() < 0.5
    body = rng.choice(v["formal"] if formal else v["informal"]).format(a=rng.choice(v["actions"]))
    # Openers and closers of either register are drawn independently of the label, so the
    # probe cannot lean on them; only the phrasing of the request itself is informative.
    text = " ".join(p for p in (rng.choice(v["openers"]), body, rng.choice(v["closers"])) if p)
    return {"text": text, "label": int(formal)}


TASKS: dict[str, TextTask] = {
    "sentiment": TextTask("sentiment", ("negative", "positive"), sentiment),
    "topic": TextTask("topic", _TOPICS, topic),
    "question": TextTask("question", ("statement", "question"), question),
    "formality": TextTask("formality", ("informal", "formal"), formality),
}


def generate(task: TextTask, n: int, seed: int, ood: bool = False) -> list[Row]:
    rng = random.Random(seed)
    return [task.make(rng, ood) for _ in range(n)]
