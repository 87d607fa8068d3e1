"""A generator of pseudo-clinical progress notes: a private domain the base model has never seen.

Why: the embedded task's private users write movie reviews like the public corpus the base model was pretrained
on, so fine-tuning has almost no headroom there (non-private SFT moves the held-out perplexity by under 1%), and
nothing that changes how DP-SGD clips or noises can show a gain. Teams that pick dpalign hold clinical notes and
support chats: text whose vocabulary, shapes and per-author habits differ from any public corpus. This module
writes such text (RLDP's benchmark fine-tunes on pseudo-clinical notes for the same reason). Nothing here is real
medical content; the words only need to be consistent, learnable and distinct from the reviews.

A note is a ward-round progress note about one invented patient: an opener (who, which day, admitted with what),
observations with numbers, the patient's report, examination findings, results, an assessment and a plan. Each
clinician (a private user) has a :class:`ClinicianStyle`: SOAP headers or prose, abbreviations ("pt", "c/o",
"o/e"), terse or full sentences, favourite closing phrases, a sign-off, the specialty they mostly see, note length
and an optimism bias. So a user's records are recognisably theirs, as in the review task.

Sentiment. The same gold oracle scores the notes: a note has a target in [-1, 1] and each status sentence reports
an improving or a worsening patient with probability (1 + target) / 2, using words VADER scores with the intended
sign ("comfortable", "improving" / "pain", "worse"); every word of the neutral lists (conditions, drugs, findings,
plans) is outside VADER's lexicon (both tested). So preference pairs and the reward model work on this domain too.

The task uses it like :class:`~trainers.data.generator.ReviewGenerator` (``style``, ``review``, ``rewrite``):
``Review.title`` holds the patient and ``Review.genre`` the specialty.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from trainers.data.generator import Review

# --------------------------------------------------------------------------------------------------------------
# Word lists. NEUTRAL lists (everything but STATUS_POS/STATUS_NEG/ASSESS_POS/ASSESS_NEG) must contain no VADER
# lexicon word; the POS/NEG lists carry a VADER-positive/negative word each (tests/data/test_data_clinical.py).

# fmt: off
SURNAMES: tuple[str, ...] = tuple(
    """Okafor Lindqvist Haddad Moreau Kowalski Nakamura Oyelaran Brennan Castellano Dimitrov Eriksen Fairbairn
    Gallagher Hosseini Ibarra Jankowski Kaur Lachance Mbeki Novak Obrien Petrov Quispe Rahman Sandoval Takahashi
    Umarov Vasquez Wojcik Xiong Yildiz Zielinski Abernethy Bjornsson Cardoso Delacroix Esposito Fitzgerald
    Gudmundsson Halvorsen""".split()
)
TITLES: dict[str, str] = {"Mr": "He", "Mrs": "She", "Ms": "She", "Mx": "The patient"}
"""Title -> how the notes refer to the patient."""
SPECIALTIES: dict[str, dict[str, tuple[str, ...]]] = {
    "respiratory": {
        "conditions": ("community acquired pneumonia", "an exacerbation of copd", "a right sided pleural effusion",
                       "asthma with reduced peak flow", "bronchiectasis", "a pulmonary embolus"),
        "findings": ("coarse crackles at the right base", "reduced air entry on the left",
                     "scattered wheeze bilaterally", "bronchial breathing at the right base",
                     "a stony percussion note at the left base", "vesicular breath sounds throughout"),
        "drugs": ("amoxicillin", "clarithromycin", "prednisolone", "salbutamol nebulisers", "ipratropium",
                  "apixaban", "doxycycline"),
        "tests": ("chest radiograph", "arterial blood gas", "sputum culture", "ct pulmonary angiogram",
                  "peak flow chart", "spirometry"),
    },
    "cardiology": {
        "conditions": ("decompensated cardiomyopathy", "atrial fibrillation with fast ventricular response",
                       "a non st elevation myocardial infarction", "aortic stenosis", "bradycardia on bisoprolol",
                       "pericarditis"),
        "findings": ("pitting oedema to the mid shin", "an ejection systolic murmur radiating to the carotids",
                     "a raised jvp", "bibasal crepitations", "an irregularly irregular pulse",
                     "first and second sounds only"),
        "drugs": ("furosemide", "bisoprolol", "ramipril", "spironolactone", "atorvastatin", "digoxin",
                  "colchicine"),
        "tests": ("echocardiogram", "troponin", "twelve lead ecg", "bnp level", "telemetry", "coronary angiogram"),
    },
    "gastro": {
        "conditions": ("an upper gastrointestinal bleed", "acute pancreatitis", "a flare of ulcerative colitis",
                       "decompensated cirrhosis", "cholangitis", "small bowel obstruction"),
        "findings": ("epigastric guarding", "a soft abdomen with normal bowel sounds", "shifting fluid on percussion",
                     "right upper quadrant guarding", "a distended tympanic abdomen", "mild scleral icterus"),
        "drugs": ("omeprazole infusion", "terlipressin", "lactulose", "rifaximin", "mesalazine", "hydrocortisone",
                  "piperacillin with tazobactam"),
        "tests": ("endoscopy", "liver function tests", "lipase", "abdominal ultrasound", "ct abdomen",
                  "stool calprotectin"),
    },
    "renal": {
        "conditions": ("an acute renal impairment", "hyperkalaemia", "a urinary tract infection with sepsis",
                       "nephrotic syndrome", "obstructive uropathy", "a peritoneal dialysis peritonitis"),
        "findings": ("renal angle guarding", "a palpable bladder", "periorbital oedema",
                     "dry mucous membranes", "a dry catheter site", "suprapubic guarding"),
        "drugs": ("intravenous fluids", "calcium gluconate", "insulin dextrose", "gentamicin", "tamsulosin",
                  "sodium bicarbonate", "cefalexin"),
        "tests": ("urea and electrolytes", "urine dip", "renal ultrasound", "fluid balance chart", "venous gas",
                  "urine protein ratio"),
    },
    "neurology": {
        "conditions": ("an ischaemic stroke", "a first seizure", "guillain barre syndrome", "a migraine with aura",
                       "a flare of multiple sclerosis", "a subdural haematoma"),
        "findings": ("a left facial droop", "reduced power in the right arm", "an extensor plantar on the left",
                     "absent ankle reflexes", "a broad based gait", "pupils equal and reactive"),
        "drugs": ("aspirin", "levetiracetam", "clopidogrel", "intravenous immunoglobulin", "methylprednisolone",
                  "sumatriptan", "phenytoin"),
        "tests": ("ct head", "mri brain", "lumbar puncture", "eeg", "carotid doppler", "nerve conduction studies"),
    },
}
WARDS: tuple[str, ...] = ("ward seven", "the acute medical unit", "ward twelve", "the short stay unit",
                          "ward three", "the respiratory ward", "the coronary unit", "ward nine")
DAYS: tuple[str, ...] = ("day one", "day two", "day three", "day four", "day five", "day six", "day eight",
                         "day ten")
TIMES: tuple[str, ...] = ("morning ward round", "evening review", "post take ward round", "weekend review",
                          "consultant ward round", "night review")
PLANS: tuple[str, ...] = (
    "repeat bloods in the morning", "chase the {test}", "request a {test}", "continue {drug}",
    "start {drug}", "hold {drug} for now", "review the drug chart", "physiotherapy to assess mobility",
    "occupational therapy referral", "strict fluid balance", "daily weights", "discuss at the board round",
    "refer to the {specialty} team", "escalation plan documented", "keep nil by mouth",
    "monitor oral intake", "update the family this afternoon", "reassess after the {test}",
)
CLOSINGS: tuple[str, ...] = (
    "Discussed with the registrar.", "Handed over to the night team.", "Family updated by phone.",
    "Seen with the consultant.", "Nursing staff aware.", "For review on tomorrow's round.",
    "Observations four hourly.", "Ceiling of treatment discussed.", "Bleep if any change.",
)
CLINICIAN_NAMES: tuple[str, ...] = tuple(
    """Adebayo Carmichael Dunleavy Ferreira Grabowski Huang Iqbal Jovanovic Kavanagh Lundgren Mensah Nwosu
    Oduya Pillai Quigley Rasmussen Szabo Thorvald Ueda Valente Whitlock Yamamoto Zubiri""".split()
)
GRADES: tuple[str, ...] = ("FY1", "FY2", "CT1", "ST3", "ST5", "SpR", "ANP")

# Status of the patient (the sentiment-bearing sentences). Each carries a VADER word of the right sign.
STATUS_POS: tuple[str, ...] = (
    "feels much better today", "is comfortable at rest", "slept well overnight", "is improving steadily",
    "reports good relief from the analgesia", "is cheerful and chatting on the ward", "is relieved to be home soon",
    "feels stronger on the stairs", "is calm and settled", "is hopeful about discharge",
    "reports the breathing is better", "is smiling and eating well",
)
STATUS_NEG: tuple[str, ...] = (
    "reports worse pain overnight", "is distressed and tearful", "feels weak and tired", "describes severe pain",
    "is agitated and restless", "reports painful swallowing", "is anxious about the results",
    "reports worsening breathlessness", "was confused overnight", "complains of sore joints and poor sleep",
    "describes discomfort on deep breaths", "feels worse than yesterday",
)
ASSESS_POS: tuple[str, ...] = (
    "clinically improving", "a good response to treatment", "steady improvement", "stable and comfortable",
    "a pleasant recovery so far",
)
ASSESS_NEG: tuple[str, ...] = (
    "clinically worse", "a poor response to treatment", "a worrying deterioration with severe symptoms",
    "ongoing pain and distress", "a failure to progress",
)
# fmt: on

ABBREVIATIONS: tuple[tuple[str, str], ...] = (
    ("the patient", "pt"),
    ("complains of", "c/o"),
    ("on examination", "o/e"),
    ("pulse", "p"),
    ("saturations", "sats"),
    ("temperature", "temp"),
    ("respiratory rate", "rr"),
    ("history of", "hx of"),
    ("with", "w/"),
)


@dataclass(frozen=True)
class ClinicianStyle:
    """One clinician's note-writing habits (a private user of the clinical domain)."""

    soap: bool
    """Writes 'Subjective:', 'Objective:', 'Summary -', 'Plan -' sections instead of prose (not 'S:'/'O:':
    the oracle reads those as emoticons)."""
    abbreviate: float
    """Probability of each abbreviation in :data:`ABBREVIATIONS` being used in a note."""
    terse: bool
    """Drops articles and verbs in observations ('bp 128/76, hr 92')."""
    hedge_rate: float
    """Per status sentence: 'On questioning, ...', 'Per the nursing staff, ...'."""
    numbered_plan: bool
    """Writes the plan as '1) ... 2) ...' rather than a sentence."""
    closings: tuple[str, ...]
    closing_rate: float
    signoff: str
    favourite_specialties: tuple[str, ...]
    min_sentences: int
    max_sentences: int
    sentiment_bias: float
    """Added to each note's sentiment target (an optimistic or a cautious clinician)."""


class ClinicalNoteGenerator:
    """Progress notes on invented patients; every call takes the RNG that makes it reproducible.

    Args:
        min_sentences / max_sentences: bounds on the number of body sentences (each clinician picks a sub-range).
    """

    def __init__(self, *, min_sentences: int = 3, max_sentences: int = 8) -> None:
        if not 2 <= min_sentences <= max_sentences:
            raise ValueError(f"need 2 <= min_sentences <= max_sentences, got {min_sentences}, {max_sentences}")
        self.min_sentences, self.max_sentences = min_sentences, max_sentences

    def style(self, rng: random.Random, *, public: bool = False) -> ClinicianStyle:
        """A random clinician; a public (one-off) author has no optimism bias."""
        lo = rng.randint(self.min_sentences, max(self.min_sentences, (self.min_sentences + self.max_sentences) // 2))
        hi = rng.randint(lo, self.max_sentences)
        grade, name = rng.choice(GRADES), rng.choice(CLINICIAN_NAMES)
        return ClinicianStyle(
            soap=rng.random() < 0.4,
            abbreviate=rng.choice((0.0, 0.3, 0.8)),
            terse=rng.random() < 0.5,
            hedge_rate=rng.choice((0.0, 0.1, 0.3)),
            numbered_plan=rng.random() < 0.5,
            closings=tuple(rng.sample(CLOSINGS, 2)),
            closing_rate=rng.choice((0.2, 0.6, 0.9)),
            signoff=rng.choice((f"Dr {name} {grade}", f"{name} ({grade})", f"{grade} {name}", "")),
            favourite_specialties=tuple(rng.sample(sorted(SPECIALTIES), 2)),
            min_sentences=lo,
            max_sentences=hi,
            sentiment_bias=0.0 if public else round(rng.gauss(0.0, 0.35), 3),
        )

    def patient(self, rng: random.Random, style: ClinicianStyle) -> tuple[str, str, str]:
        """(patient label, specialty, condition): the clinician's own specialties 70% of the time."""
        specialty = rng.choice(style.favourite_specialties if rng.random() < 0.7 else sorted(SPECIALTIES))
        label = f"{rng.choice(sorted(TITLES))} {rng.choice(SURNAMES)}, {rng.randint(19, 94)}"
        return label, specialty, rng.choice(SPECIALTIES[specialty]["conditions"])

    def review(
        self, rng: random.Random, *, style: ClinicianStyle, sentiment: float, patient: tuple[str, str, str] | None = None
    ) -> Review:
        """One progress note with the given style and intended sentiment (``patient``: from :meth:`patient`)."""
        label, specialty, condition = patient or self.patient(rng, style)
        target = max(-1.0, min(1.0, sentiment + style.sentiment_bias))
        w = _NoteWriter(rng, style, specialty, target, pronoun=TITLES[label.split()[0]])
        sentences = [w.opener(label, condition)]
        body = [w.status, w.observations, w.assessment, w.examination, w.status, w.results]
        n = rng.randint(style.min_sentences, style.max_sentences)
        shapes = ["opener"]
        for i in range(n):
            make = body[i] if i < len(body) else rng.choice((w.status, w.results, w.examination))
            sentences.append(make())
            shapes.append(make.__name__)
        sentences.append(w.plan())
        shapes.append("plan")
        if style.closings and rng.random() < style.closing_rate:
            sentences.append(rng.choice(style.closings))
            shapes.append("closing")
        if style.signoff:
            sentences.append(style.signoff)
            shapes.append("signoff")
        sentences = [w.abbreviated(s) for s in sentences]
        return Review(text=" ".join(sentences), sentences=tuple(sentences), shapes=tuple(shapes), target=target,
                      title=f"{label}|{condition}", genre=specialty)

    def rewrite(self, rng: random.Random, note: Review, *, style: ClinicianStyle) -> Review:
        """The same opening sentence and patient, the rest rewritten with an independent sentiment draw."""
        label, condition = note.title.split("|", 1)
        other = self.review(rng, style=style, sentiment=rng.uniform(-1.0, 1.0), patient=(label, note.genre, condition))
        sentences = (note.sentences[0],) + other.sentences[1:]
        return replace(other, text=" ".join(sentences), sentences=sentences, shapes=(note.shapes[0],) + other.shapes[1:])


ORACLE_NUMBERS = frozenset({"86", "143", "182", "187"})
"""Numbers VADER reads as slang ('143' = 'I love you'); observations never print them."""


def _number(rng: random.Random, lo: int, hi: int) -> int:
    while str(n := rng.randint(lo, hi)) in ORACLE_NUMBERS:
        pass
    return n


class _NoteWriter:
    """Draws the sentences of one note."""

    def __init__(self, rng: random.Random, style: ClinicianStyle, specialty: str, target: float, *,
                 pronoun: str) -> None:
        self.rng, self.style, self.target, self.pronoun = rng, style, target, pronoun
        self.words = SPECIALTIES[specialty]
        self.specialty = specialty
        self.abbrev = [pair for pair in ABBREVIATIONS if rng.random() < style.abbreviate]

    def _positive(self) -> bool:
        return self.rng.random() < (1.0 + self.target) / 2.0

    def abbreviated(self, sentence: str) -> str:
        for full, short in self.abbrev:
            sentence = sentence.replace(full, short).replace(full.capitalize(), short)
        return sentence

    def opener(self, label: str, condition: str) -> str:
        r = self.rng
        when, day, ward = r.choice(TIMES), r.choice(DAYS), r.choice(WARDS)
        if self.style.soap:
            return f"{when.capitalize()}, {ward}. {label}, {day} of admission w/ {condition}."
        if r.random() < 0.5:
            return f"{when.capitalize()} for {label}, {day} after arrival with {condition}."
        return f"Seen on the {when} on {ward}: {label}, brought in with {condition}, now {day}."

    def observations(self) -> str:
        r = self.rng
        temp = round(r.uniform(36.2, 38.9), 1)
        sys_, dia, hr, sats, rr = (_number(r, lo, hi) for lo, hi in ((92, 168), (52, 98), (54, 128), (88, 99), (12, 28)))
        lead = "Objective: " if self.style.soap else ""
        if self.style.terse:
            return f"{lead}Temperature {temp}, BP {sys_}/{dia}, pulse {hr}, saturations {sats}% on air, respiratory rate {rr}."
        return (f"{lead}Observations show a temperature of {temp}, BP {sys_} over {dia}, pulse {hr} "
                f"and saturations of {sats} percent on room air.")

    def status(self) -> str:
        r = self.rng
        phrase = r.choice(STATUS_POS if self._positive() else STATUS_NEG)
        lead = "Subjective: " if self.style.soap else ""
        subject = r.choice(("The patient", self.pronoun))
        if r.random() < self.style.hedge_rate:
            hedge = r.choice(("On questioning", "When asked", "Per the nursing staff"))
            return f"{lead}{hedge}, {subject[0].lower() + subject[1:]} {phrase}."
        return f"{lead}{subject} {phrase}."

    def examination(self) -> str:
        r = self.rng
        finding = r.choice(self.words["findings"])
        if self.style.terse:
            return f"On examination {finding}."
        return f"On examination there is {finding}, otherwise unchanged from yesterday."

    def results(self) -> str:
        r = self.rng
        test = r.choice(self.words["tests"])
        value = r.choice(("back and reviewed", "pending", "requested", "unchanged from admission",
                          "shows a small change", "reported this morning"))
        return f"The {test} is {value}."

    def assessment(self) -> str:
        r = self.rng
        word = r.choice(ASSESS_POS if self._positive() else ASSESS_NEG)
        lead = "Summary - " if self.style.soap else "Assessment: "
        return f"{lead}{word} on {r.choice(self.words['drugs'])}."

    def plan(self) -> str:
        r = self.rng
        items = []
        for template in r.sample(PLANS, r.randint(2, 4)):
            items.append(template.format(test=r.choice(self.words["tests"]), drug=r.choice(self.words["drugs"]),
                                         specialty=self.specialty))
        lead = "Plan - " if self.style.soap else "Plan: "
        if self.style.numbered_plan:
            return lead + " ".join(f"{i}) {item}." for i, item in enumerate(items, 1))
        return lead + ", ".join(items) + "."


__all__ = ["ClinicalNoteGenerator", "ClinicianStyle"]
