"""The bundled dataset: the English ChatterBot corpus (``chatterbot-corpus`` 1.3.3, BSD-3).

The corpus is one YAML file per topic (``chatterbot_corpus/data/english/*.yml``), each with a
``categories`` list and a ``conversations`` list of utterance lists; 2,026 conversations in all.
An entry that is not a list of at least two text utterances is skipped (``trivia.yml``
has one conversation written as a single string). The corpus is installed as a wheel (``pip install 'hfedmoe[assets]'``), so nothing is downloaded.

Two views, both in a fixed order (files sorted by name, conversations in file order):

* **topic classification** (:func:`chatterbot_classification`): text = the first utterance of a
  conversation, label = the file's first category. Many first utterances repeat inside a file
  (``tech_support.yml`` has 1,050 conversations over 10 distinct questions, ``humor.yml`` asks
  "Tell me a joke" 30 times), and a few appear under two topics ("Hello"). Repeats would leak
  between the train and test splits and cross-topic texts have no single true label, so texts are
  de-duplicated within a topic, texts found under more than one topic are dropped, and topics with
  fewer than ``min_examples`` (default 20) distinct texts are dropped. With the defaults 10 topics
  and 643 texts remain::

      AI 60, coding 96, conversations 20, emotion 48, literature 29, movies 23,
      psychology 62, science 23, sports 22, trivia 260

  (dropped: computers 10, food 13, gossip 6, greetings 9, health 1, history 8, humor 2,
  money 16, politics 13, profile 14, tech support 10).

* **prompt/response pairs** (:func:`chatterbot_pairs`): prompt = the first utterance, response =
  the reply (the second utterance), group label = the topic. Every topic is kept and only exact
  duplicate pairs are dropped, since different replies to one prompt are useful LM targets
  (897 pairs over 21 topics: ``tech_support.yml``'s 1,050 conversations are 10 pairs repeated).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from hfedmoe.data.dataset import PairDataset, TextDataset, encode_labels
from hfedmoe.errors import DataError

__all__ = ["MIN_EXAMPLES", "Conversation", "chatterbot_classification", "chatterbot_pairs",
           "corpus_dir", "read_conversations"]

MIN_EXAMPLES = 20  # a topic needs this many distinct texts to stay in the classification task


@dataclass(frozen=True)
class Conversation:
    """One conversation of the corpus: its topic and its first two utterances."""

    topic: str
    question: str
    reply: str


def corpus_dir() -> Path:
    """The directory of the installed corpus' English YAML files."""
    try:
        import chatterbot_corpus
    except ImportError as exc:
        raise DataError("the 'chatterbot' dataset needs the chatterbot-corpus package: "
                        "pip install 'hfedmoe[assets]'") from exc
    return Path(chatterbot_corpus.__file__).resolve().parent / "data" / "english"


def _read_file(path: Path) -> list[Conversation]:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: line 1: unreadable YAML ({exc})") from exc
    if not isinstance(doc, dict) or not doc.get("categories"):
        raise DataError(f"{path}: line 1: expected 'categories' and 'conversations' keys")
    topic = str(doc["categories"][0])
    out = []
    for conv in doc.get("conversations") or []:
        # Skip malformed entries (trivia.yml has one conversation written as a single string).
        if (isinstance(conv, list) and len(conv) >= 2
                and all(isinstance(u, str) and u.strip() for u in conv[:2])):
            out.append(Conversation(topic, conv[0].strip(), conv[1].strip()))
    return out


def read_conversations(directory: str | Path | None = None) -> list[Conversation]:
    """Every conversation of the corpus, files sorted by name, conversations in file order.

    Args:
        directory: A directory of corpus YAML files; the installed English corpus by default.

    Returns:
        The conversations (topic, first utterance, reply).
    """
    d = Path(directory) if directory is not None else corpus_dir()
    return list(_read_dir(d.resolve()))


@lru_cache(maxsize=4)
def _read_dir(d: Path) -> tuple[Conversation, ...]:
    files = sorted(d.glob("*.yml"))
    if not files:
        raise DataError(f"{d}: no corpus *.yml files")
    return tuple(c for f in files for c in _read_file(f))


def chatterbot_classification(min_examples: int = MIN_EXAMPLES,
                              directory: str | Path | None = None) -> TextDataset:
    """The corpus as topic classification (first utterance -> topic).

    Args:
        min_examples: Topics with fewer distinct texts are dropped.
        directory: Corpus directory; the installed English corpus by default.

    Returns:
        De-duplicated texts in corpus order, labelled by topic (sorted vocabulary).
    """
    convs = read_conversations(directory)
    topics_of: dict[str, set[str]] = defaultdict(set)
    for c in convs:
        topics_of[c.question].add(c.topic)
    seen: set[str] = set()
    kept: list[tuple[str, str]] = []
    for c in convs:
        if len(topics_of[c.question]) == 1 and c.question not in seen:
            seen.add(c.question)
            kept.append((c.question, c.topic))
    per_topic: dict[str, int] = defaultdict(int)
    for _, topic in kept:
        per_topic[topic] += 1
    kept = [(q, t) for q, t in kept if per_topic[t] >= min_examples]
    if not kept:
        raise DataError(f"no corpus topic has {min_examples} distinct texts")
    ids, names = encode_labels([t for _, t in kept])
    return TextDataset(tuple(q for q, _ in kept), ids, names)


def chatterbot_pairs(directory: str | Path | None = None) -> PairDataset:
    """The corpus as prompt/response pairs (first utterance -> reply), grouped by topic.

    Args:
        directory: Corpus directory; the installed English corpus by default.

    Returns:
        Pairs in corpus order without exact duplicates; labels are the topics.
    """
    seen: set[tuple[str, str]] = set()
    kept: list[Conversation] = []
    for c in read_conversations(directory):
        if (c.question, c.reply) not in seen:
            seen.add((c.question, c.reply))
            kept.append(c)
    ids, names = encode_labels([c.topic for c in kept])
    return PairDataset(tuple(c.question for c in kept), tuple(c.reply for c in kept), ids, names)
