"""Entity nouns of a caption: the detector's prompt words (rule-based, where the paper
uses spaCy; docs/method.md §5).

The authors tag BLIP-2 captions with spaCy's `en_core_web_sm` and take every NOUN token.
That model package cannot be installed from the package index here, so this is a small
rule-based stand-in written for BLIP-2's captions, which are short, lower-case noun
phrases joined by prepositions and participles: "two dogs playing with a frisbee in the
grass", "a woman in a red dress holding an umbrella".

Rules: a caption is split into words; punctuation and closed-class words (determiners, numbers,
prepositions, conjunctions, pronouns, auxiliaries, a few common verbs) end the current noun
phrase; a word ending in -ing or -ed ends it too when the phrase already has a noun (a
participle: "a dog *running*") but belongs to it right after a determiner or adjective ("a
*sleeping* cat", "a *building*"). The head of a phrase is its last word that is not a
listed adjective ("a fire hydrant" -> hydrant). Words that name the picture or a quantity
rather than an entity ("photo", "pair", "background") are left out, and each noun is
returned once, in caption order.
"""

from __future__ import annotations

import re


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_DETERMINERS = _words(
    "a an the this that these those some many several each every any another other "
    "his her its their our my your no both few"
)
_NUMBERS = _words("one two three four five six seven eight nine ten eleven twelve dozen hundreds")
_BREAKS = _words(  # closed-class words that end a noun phrase
    # prepositions and particles
    "of in on at with by near next to from under over above below behind beside besides "
    "between into onto through for against along around across inside outside up down off "
    "out during while like about among toward towards upon underneath atop beneath "
    "without within past as than "
    # conjunctions, pronouns, auxiliaries, adverbs
    "and or but nor so yet it he she they them him we us i you who whom whose which what "
    "there here where when is are was were be been being am has have had do does did can "
    "could will would may might very too also just really together "
    # common present-tense verbs of captions
    "sits stands lies holds looks walks runs rides plays eats wears shows features "
    "contains sit stand lie hold look walk run ride play eat wear show"
)
_ADJECTIVES = _words(
    # colours and tones
    "red orange yellow green blue purple pink brown black white gray grey beige gold golden "
    "silver colorful colourful dark light bright pale "
    # size, shape, age, number-like
    "small large big little tiny huge giant tall short long wide narrow round square old "
    "young new empty full single double various different same "
    # materials and common qualities
    "wooden metal metallic plastic glass paper stone leather cute beautiful pretty "
    "happy funny close closeup vintage modern open closed wet dry hot cold fresh "
    "stuffed"
)
_NOT_ENTITIES = _words(  # name the picture or a quantity, not something to detect
    "photo photograph picture image view shot closeup close-up background foreground front "
    "side top bottom middle center centre lot couple group bunch pair kind type variety "
    "number set piece lots"
)
_ING_ED_NOUNS = _words(  # nouns that look like participles
    "building painting ceiling clothing string swing railing frosting icing pudding "
    "wedding dumpling stuffing awning thing evening morning sibling bedding lightning "
    "ring wing king"
)
_TOKEN = re.compile(r"[a-z]+(?:[-'][a-z]+)*|[0-9]+|[,.;:!?()]")  # words, numbers, punctuation


def _is_participle(word: str) -> bool:
    if len(word) <= 4 or word in _ING_ED_NOUNS:
        return False
    # -eed and -ead end nouns (seed, bread) more often than participles
    return word.endswith("ing") or (word.endswith("ed") and not word.endswith(("eed", "ead")))


def _head(phrase: list[str]) -> str | None:
    for word in reversed(phrase):
        if word not in _ADJECTIVES:
            return word
    return None


def caption_nouns(caption: str) -> list[str]:
    """The caption's entity nouns, each once, in order ('a dog on a sofa' -> ['dog', 'sofa'])."""
    heads: list[str] = []
    phrase: list[str] = []  # open-class words of the current noun phrase
    after_opener = False  # the previous word was a determiner or number

    def close() -> None:
        head = _head(phrase)
        if head is not None and head not in _NOT_ENTITIES and head not in heads:
            heads.append(head)
        phrase.clear()

    for word in _TOKEN.findall(caption.lower()):
        if word in _DETERMINERS or word in _NUMBERS or word.isdigit():
            close()
            after_opener = True
            continue
        has_noun = _head(phrase) is not None
        if word in _BREAKS or not word[0].isalpha() or (_is_participle(word) and has_noun):
            close()
        elif _is_participle(word) and not (after_opener or phrase):
            pass  # a verb after an auxiliary or a conjunction: "is *standing*"
        else:
            phrase.append(word)
        after_opener = False
    close()
    return heads
