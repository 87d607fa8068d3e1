"""A generator of movie-review-like English text with controllable sentiment, topic and per-user style.

Why a generator: no model hub or IMDb download is reachable where dpalign is developed, so the embedded task needs
text that a small language model can learn something real from, and whose sentiment a lexicon oracle (VADER)
tracks. The text is built from a catalogue of invented movies (titles, directors, actors, characters, settings and
premises made up combinatorially), large hand-written word lists, and a grammar of ~45 sentence shapes: openers,
simple and compound opinions, contrastive "but" and "although" sentences, comparisons, questions, lists, negated
praise, causal and temporal clauses, plot summaries and verdicts.

Sentiment. A review has a target in [-1, 1]. Each opinion sentence is positive with probability (1 + target) / 2,
so a target near 0 gives a genuinely mixed review; intensity (boosters such as "really", exclamation marks) grows
with |target|. Every sentiment-bearing word is in VADER's lexicon with the right sign, and every word of the
neutral lists is outside it (both are tested), so the oracle follows the intended sentiment.

Style. A :class:`UserStyle` fixes one author's habits: exclamation and ellipsis rates, hedging ("I think"),
first-person phrasing, boosters or dampeners, favourite phrases, a preferred sub-vocabulary of adjectives,
favourite genres, review length and a sentiment bias. The private users of the task each get one, so their
records are recognisably theirs (what makes memorisation, and so privacy, matter).

Determinism. Everything is drawn from ``random.Random`` instances passed in or seeded from strings; no global
random state is read or written. The same seed gives the same text on every platform and Python version >= 3.10.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

# --------------------------------------------------------------------------------------------------------------
# Word lists. NEUTRAL lists must contain no VADER lexicon word; POS_*/NEG_* lists must be VADER-positive/negative
# (tests/data/test_data_generator.py checks both).

# fmt: off
FIRST_NAMES: tuple[str, ...] = tuple(
    """Ada Alan Alba Amos Anya Arlo Asha Bea Bram Cai Cara Cecil Clara Cole Dara Dev Dina Doran Edda Eli Elin Emil
    Enzo Esme Ezra Fern Finn Flora Gael Gemma Gil Greta Hana Hugo Ida Igor Ines Ira Isla Ivo Jade Jonah Juno Kai
    Kaia Kenji Kira Lars Lena Leo Lila Linus Lior Lottie Luca Mabel Mae Malik Mara Marek Mila Milo Mina Nadia Nell
    Nico Nina Noor Odile Olek Omar Orla Oskar Otto Pia Quinn Rafe Ravi Rhea Rosa Rufus Saba Sami Silas Sofia Soren
    Suki Tamsin Teo Thea Tobias Uma Vera Vik Wren Xavi Yara Yusuf Zadie Zane Zora Agnes Basil Cosima Dmitri Elodie
    Florian Gustav Henrietta Ignatius Josefina Konstantin Leopold Magnus Ottilie Philippa Rosalind Sebastian
    Theodora Valentina Wilhelmina Augustin Beatrix Cornelius Desmond Evander""".split()
)
_SURNAME_HEADS: tuple[str, ...] = tuple(
    """Ash Black Bram Brook Calder Cold Crane Dun Elder Fen Frost Gold Gray Hale Haw Hol Iver Kings Lang Lark
    Marsh Mill Moor North Oak Pem Red Rook Rush Sand Silver Stan Stone Thorn Under Vale West Whit Wind Wolf Wren
    Yar Ald Bel Cor Dal Har Mor""".split()
)
_SURNAME_TAILS: tuple[str, ...] = tuple(
    """by bridge brook bury combe croft dale field ford gate grove ham hart hill holm hurst ley mere mont more
    ridge shaw stead stone thorpe ton wick wood""".split()
)
TITLE_ADJ: tuple[str, ...] = tuple(
    """Amber Ashen Autumn Azure Blue Brass Cobalt Copper Crimson Distant Eastern Electric Emerald Endless Final
    Glass Golden Hidden Hollow Iron Ivory Last Long Lunar Midnight Narrow Northern Open Painted Paper Quiet Red
    Scarlet Second Silent Silver Sleeping Southern Stone Summer Sunken Tall Velvet Violet Waking Western
    Wild Winter Wooden Yellow Burning Frozen Folded Twelfth Seventh Midsummer Copperhead Floating""".split()
)
TITLE_NOUNS: tuple[str, ...] = tuple(
    """Anchor Archive Atlas Avenue Ballad Bell Bridge Canal Canyon Carousel Cartographer Cellar Circus Clock
    Compass Corridor Crossing Current Dancer Delta Diver Empire Engine Estate Ferry Fever Frontier Garden Harbor
    Harvest Highway Horizon Hotel Island Kingdom Ladder Lantern Lighthouse Machine Meridian Mirror Monsoon Orchard
    Outpost Parade Passage Pilgrim Prairie Quarry Railway Reservoir River Satellite Season Signal Sparrow Station
    Summit Swimmer Tailor Telescope Tide Tower Train Tunnel Valley Voyage Window Witness Orbit Harpoon Greenhouse
    Observatory Caravan Tangerine Typewriter Accordion""".split()
)
PLACES: tuple[str, ...] = (
    "a fishing village in Norway", "Lisbon", "a mining town in Montana", "Osaka", "a space station above Jupiter",
    "a boarding school in Scotland", "Marseille", "a lighthouse off the coast of Maine", "Buenos Aires",
    "a sleepy suburb of Ohio", "Istanbul", "a research base in Antarctica", "Havana", "a vineyard in Tuscany",
    "New Orleans", "a tiny island in the Pacific", "Berlin in the seventies", "a ranch in Wyoming", "Mumbai",
    "a luxury hotel in the Alps", "Reykjavik", "a submarine", "a desert outpost", "Montreal", "a river town",
    "Kyoto", "a colony on Mars", "Dublin", "a cruise ship", "a mountain monastery", "Nairobi", "a jazz club",
    "rural Quebec", "Seoul", "a circus on tour", "Glasgow", "a farmhouse in Iowa", "Vienna", "an old theater",
    "Cape Town", "a train crossing Siberia", "Naples", "a university campus", "Santiago", "Prague",
)
GENRES: dict[str, dict[str, tuple[str, ...]]] = {
    "drama": {
        "characters": (
            "a schoolteacher", "two estranged sisters", "an aging pianist", "a young nurse", "a factory worker",
            "a small-town mayor", "a retired sailor", "a single father",
        ),
        "goals": (
            "who returns home after twenty years", "who tries to keep the family farm",
            "who takes a job across the country", "who must decide whether to sell the house",
            "who starts writing letters to a stranger", "who looks after an elderly neighbor",
        ),
        "events": (
            "reads the last letter", "walks out of the wedding", "sits at the kitchen table at dawn",
            "finally visits the hospital", "opens the old piano",
        ),
    },
    "slapstick caper": {
        "characters": (
            "a clumsy wedding planner", "two rival chefs", "an unemployed magician", "a first-time groom",
            "a family of amateur detectives", "a substitute teacher", "a retired astronaut",
        ),
        "goals": (
            "who double-books two weddings on the same day", "who enters a baking contest",
            "who poses as a famous author", "who inherits a llama farm", "who organizes a school reunion",
            "who tries to get back a parrot",
        ),
        "events": (
            "crashes the dinner", "lands in the fountain", "sings karaoke at the rehearsal dinner",
            "drives the tractor into the lake", "gives the toast",
        ),
    },
    "suspense film": {
        "characters": (
            "a retired detective", "a young lawyer", "an undercover reporter", "a hacker", "a border guard",
            "a diplomat", "a night-shift pilot", "a forensic accountant",
        ),
        "goals": (
            "who follows a trail of coded messages", "who uncovers a scheme at the bank",
            "who has one night to find a witness", "who gets a phone call from an unknown caller",
            "who tracks a courier across Europe", "who investigates a vanished ship",
        ),
        "events": (
            "opens the briefcase", "gets to the rooftop", "decodes the final message", "meets the senator",
            "boards the night train",
        ),
    },
    "supernatural chiller": {
        "characters": (
            "a family of five", "a group of college roommates", "a quiet caretaker", "a night watchman",
            "a young priest", "a paranormal investigator", "two sisters",
        ),
        "goals": (
            "who moves into an old farmhouse", "who spends a weekend in a cabin by the lake",
            "who finds a locked room in the basement", "who hears voices in the radio static",
            "who explores a shuttered hospital", "who repairs an antique doll",
        ),
        "events": (
            "opens the cellar door", "looks into the mirror", "hears the music box",
            "walks down the corridor at night", "finds the old photographs",
        ),
    },
    "science fiction": {
        "characters": (
            "a solitary astronaut", "an android", "a young engineer", "a ship captain", "a linguist",
            "a colony doctor", "a time traveler", "a maintenance robot",
        ),
        "goals": (
            "who receives a signal from deep space", "who wakes up decades early on a colony ship",
            "who must translate an alien language", "who repairs a satellite in orbit",
            "who builds a machine that bends time", "who explores a frozen moon",
        ),
        "events": (
            "opens the airlock", "gets to the alien ship", "boots up the old computer", "steps onto the surface",
            "sends the final transmission",
        ),
    },
    "western": {
        "characters": (
            "an aging sheriff", "a young rancher", "a traveling preacher", "a card player", "a frontier doctor",
            "a stagecoach driver", "a bounty hunter",
        ),
        "goals": (
            "who rides into a dusty frontier town", "who drives cattle across the plains",
            "who guards a gold shipment", "who searches for a runaway brother",
            "who builds a railroad through the canyon", "who defends a homestead",
        ),
        "events": (
            "rides into town at dawn", "walks into the saloon", "crosses the river", "faces the outlaw at noon",
            "gets to the canyon",
        ),
    },
    "courtship drama": {
        "characters": (
            "a bookshop owner", "a wedding photographer", "a violinist", "a park ranger",
            "two childhood neighbors", "a translator", "a baker",
        ),
        "goals": (
            "who meets a stranger on a night train", "who falls for a rival architect",
            "who spends one summer in Paris", "who writes anonymous letters",
            "who returns for a high school reunion", "who repairs an old sailboat",
        ),
        "events": (
            "waits at the station", "reads the letter aloud", "dances in the rain", "runs through the airport",
            "finally says it",
        ),
    },
    "wartime epic": {
        "characters": (
            "a young soldier", "a field medic", "a radio operator", "a tank commander", "a pilot",
            "a village schoolteacher",
        ),
        "goals": (
            "who crosses the front lines", "who carries a message to the front",
            "who leads a small unit through the mountains", "who shelters a family in the attic",
            "who waits for news from the front",
        ),
        "events": (
            "crosses the bridge", "gets to the trenches", "hears the planes overhead", "reads the telegram",
            "climbs the ridge",
        ),
    },
    "musical": {
        "characters": (
            "a young singer", "a street dancer", "a theater producer", "a choir director", "a jazz trumpeter",
            "a ballet student",
        ),
        "goals": (
            "who auditions for a Broadway show", "who reopens a closed theater", "who forms a band with strangers",
            "who travels to Vienna for a competition", "who writes one last song",
        ),
        "events": (
            "takes the stage", "sings the final song", "starts the rehearsal", "tunes the old piano",
            "dances on the rooftop",
        ),
    },
    "documentary": {
        "characters": (
            "a marine biologist", "a team of climbers", "a village of beekeepers", "a chess prodigy",
            "a family of farmers", "an orchestra",
        ),
        "goals": (
            "who spends a year in the Arctic", "who attempts a winter ascent",
            "who prepares for a national tournament", "who records vanishing languages",
            "who rebuilds a village after the floods",
        ),
        "events": (
            "gets to the summit", "opens the hives", "starts the final game", "returns to the island",
            "records the last speaker",
        ),
    },
    "animated film": {
        "characters": (
            "a young fox", "a tiny robot", "a young dragon", "a runaway penguin", "a family of mice",
            "a paper bird",
        ),
        "goals": (
            "who sets out to find the end of the rainbow", "who builds a boat to cross the ocean",
            "who learns to fly", "who looks for a new home before winter", "who travels to the city of lanterns",
        ),
        "events": (
            "gets to the lantern city", "jumps off the cliff", "meets the old owl", "crosses the frozen lake",
            "opens the map",
        ),
    },
    "mystery": {
        "characters": (
            "a village librarian", "a retired inspector", "an amateur sleuth", "a hotel concierge",
            "a crossword editor", "a lighthouse keeper",
        ),
        "goals": (
            "who investigates a vanished painting", "who finds a coded diary",
            "who questions eight guests at a country house", "who notices a clock that runs backwards",
            "who follows footprints in the snow",
        ),
        "events": (
            "gathers the guests in the library", "opens the diary", "finds the second key",
            "explains the timetable", "returns to the station",
        ),
    },
    "heist film": {
        "characters": (
            "a veteran locksmith", "a crew of retired magicians", "a museum guard", "a getaway driver",
            "a young forger", "an insurance investigator",
        ),
        "goals": (
            "who plans one last job", "who targets a casino vault", "who swaps a famous emerald",
            "who breaks into the national mint", "who recruits an old partner",
        ),
        "events": (
            "opens the vault", "shuts off the power", "switches the briefcases", "walks past the guards",
            "drives through the tunnel",
        ),
    },
    "sports drama": {
        "characters": (
            "an aging boxer", "a high school coach", "a young swimmer", "a rookie pitcher", "a cycling team",
            "a chess player",
        ),
        "goals": (
            "who trains for one more title bout", "who takes a small-town team to the finals",
            "who prepares for the Olympics", "who returns after a long layoff", "who coaches a team of misfits",
        ),
        "events": (
            "steps into the ring", "takes the final shot", "crosses the finish line", "walks onto the field",
            "hears the final whistle",
        ),
    },
}
ASPECTS: tuple[str, ...] = (
    "the acting", "the plot", "the score", "the cinematography", "the pacing", "the dialogue", "the script",
    "the editing", "the direction", "the ending", "the opening scene", "the third act", "the soundtrack",
    "the set design", "the costumes", "the visual effects", "the lead performance", "the ensemble cast",
    "the screenplay", "the camera work", "the lighting", "the production design", "the sound design",
    "the final twist", "the middle section", "the character development", "the world building", "the first half",
    "the climax", "the casting", "the choreography", "the makeup", "the runtime", "the premise",
    "the side characters", "the subplot", "the flashbacks", "the narration", "the framing", "the color palette",
    "the editing rhythm", "the last ten minutes",
)
FILM_NOUNS: tuple[str, ...] = ("film", "movie", "picture", "feature", "story", "production", "effort")
NEUTRAL_ADJ: tuple[str, ...] = (
    "long", "quiet", "slow", "loud", "dark", "colorful", "sparse", "dense", "old-fashioned", "modern",
    "understated", "theatrical", "minimalist", "operatic", "deliberate", "talky", "episodic", "unusual",
    "restrained", "busy", "measured", "snappy", "grainy", "saturated", "austere", "lush", "naturalistic",
    "stylized", "layered", "linear", "nonlinear", "dreamlike", "muted", "ornate", "handheld", "static",
)
POS_ADJ: tuple[str, ...] = (
    "brilliant", "superb", "stunning", "gorgeous", "charming", "delightful", "hilarious", "excellent", "wonderful",
    "fantastic", "beautiful", "amazing", "awesome", "impressive", "elegant", "clever", "thrilling", "inspiring",
    "fun", "enjoyable", "lovely", "pleasant", "solid", "strong", "rich", "warm", "smart", "bold", "great", "good",
    "nice", "perfect", "terrific", "outstanding", "marvelous", "magnificent", "splendid", "glorious", "graceful",
    "joyful", "sweet", "heartwarming", "engaging", "entertaining", "fascinating", "intelligent", "creative",
    "original", "wise", "sincere", "confident", "playful", "lively", "energetic", "exciting", "remarkable",
    "flawless", "satisfying", "rewarding", "admirable", "ambitious", "beloved", "fabulous", "gentle", "hopeful",
    "interesting", "peaceful", "pleasing", "precious", "pretty", "radiant", "romantic", "special", "successful",
    "talented", "thoughtful", "triumphant", "vibrant", "worthy", "adorable", "compelling", "ecstatic", "fearless",
    "honest", "innovative", "passionate", "powerful", "superior",
)
NEG_ADJ: tuple[str, ...] = (
    "dull", "boring", "awful", "terrible", "horrible", "dreadful", "messy", "confusing", "stupid", "lazy", "weak",
    "painful", "annoying", "ridiculous", "disappointing", "miserable", "ugly", "poor", "bad", "awkward", "bizarre",
    "careless", "crude", "dismal", "dumb", "empty", "feeble", "frustrating", "grim", "gross", "idiotic",
    "insulting", "irritating", "lame", "lousy", "nasty", "obnoxious", "offensive", "pathetic", "tired", "trite",
    "unpleasant", "useless", "worthless", "clueless", "depressing", "dire", "disastrous", "embarrassing",
    "exhausting", "forced", "horrendous", "humiliating", "ludicrous", "mindless", "sad", "sickening", "dreary",
    "flawed", "gloomy", "greedy", "joyless", "pitiful",
)
# Adjectives VADER does not know: richer text, used only next to a lexicon word so the oracle still tracks.
POS_FLAVOUR: tuple[str, ...] = (
    "vivid", "tender", "memorable", "exquisite", "uplifting", "touching", "genuine", "stellar", "phenomenal",
    "extraordinary", "sublime", "refreshing", "incredible", "majestic", "spectacular", "tremendous", "captivating",
    "dazzling", "enchanting", "masterful", "poignant", "sensational", "skillful", "witty",
)
NEG_FLAVOUR: tuple[str, ...] = (
    "tedious", "bland", "lifeless", "clumsy", "pointless", "mediocre", "predictable", "shallow", "sloppy",
    "pretentious", "cheap", "hideous", "incoherent", "inept", "monotonous", "stale", "tacky", "unconvincing",
    "uninspired", "wretched", "amateurish", "stiff", "hollow", "overrated", "shoddy", "tasteless", "unbearable",
    "unfunny", "unwatchable", "vulgar", "abysmal", "aimless", "bleak", "irrelevant", "lackluster", "nonsensical",
)
POS_VERBS: tuple[str, ...] = (
    "delights", "impresses", "succeeds", "excels", "charms", "wins", "triumphs", "thrills", "inspires",
    "entertains", "sparkles", "amazes", "satisfies",
)
NEG_VERBS: tuple[str, ...] = (
    "fails", "bores", "disappoints", "annoys", "suffers", "struggles", "collapses", "ruins", "frustrates",
    "irritates", "drags", "confuses", "loses",
)
POS_NOUNS: tuple[str, ...] = (
    "a triumph", "a masterpiece", "a joy", "a delight", "a treat", "a pleasure", "a success", "a gift", "a marvel",
    "a winner", "a blessing",
)
NEG_NOUNS: tuple[str, ...] = (
    "a mess", "a disaster", "a failure", "a bore", "a waste", "a disappointment", "a catastrophe", "a fiasco",
    "an embarrassment", "a tragedy",
)
POS_FEEL: tuple[str, ...] = (
    "delighted", "thrilled", "amused", "impressed", "excited", "happy", "satisfied", "inspired", "charmed",
    "entertained", "glad", "pleased", "grateful", "enchanted", "relieved", "joyful",
)
NEG_FEEL: tuple[str, ...] = (
    "bored", "annoyed", "disappointed", "frustrated", "irritated", "confused", "angry", "exhausted", "miserable",
    "offended", "depressed", "disgusted", "sad", "tired", "restless", "upset", "embarrassed",
)
POS_MANNER: tuple[str, ...] = (
    "beautifully", "wonderfully", "brilliantly", "gracefully", "elegantly", "confidently", "cleverly", "perfectly",
    "lovingly", "warmly", "tenderly", "joyfully",
)
NEG_MANNER: tuple[str, ...] = (
    "badly", "awkwardly", "carelessly", "terribly", "horribly", "miserably", "stupidly", "painfully", "dully",
    "pathetically",
)
POS_1P_VERBS: tuple[str, ...] = ("loved", "enjoyed", "admired", "adored", "appreciated", "liked", "cherished")
NEG_1P_VERBS: tuple[str, ...] = ("hated", "disliked", "resented", "despised", "regretted", "dreaded")
POS_REACTIONS: tuple[str, ...] = (
    "laughed", "smiled", "cheered", "grinned", "applauded", "celebrated", "giggled", "chuckled",
)
NEG_REACTIONS: tuple[str, ...] = ("complained", "cried", "fumed", "whined", "wept", "panicked")
BOOSTERS: tuple[str, ...] = (
    "really", "very", "truly", "extremely", "incredibly", "absolutely", "remarkably", "utterly", "deeply",
    "thoroughly", "exceptionally", "so", "totally", "especially",
)
DAMPENERS: tuple[str, ...] = ("somewhat", "kind of", "sort of", "slightly", "a little", "fairly", "rather")
HEDGES: tuple[str, ...] = (
    "I think", "I suppose", "In my view,", "As far as I can tell,", "If you ask me,", "I would say",
    "As I see it,", "Perhaps", "I guess", "Presumably", "It seems to me that", "Maybe",
)
FAVOURITE_PHRASES: tuple[str, ...] = (
    "all things considered", "mark my words", "for the record", "in a nutshell", "believe it or not",
    "between you and me", "at the end of the day", "as they say", "so to speak", "to put it simply",
    "long story short", "if I am being picky", "on balance", "by and large", "then again", "in hindsight",
    "as a rule", "come to think of it", "for my money", "when all is said and done", "at any rate",
    "as it happens", "in any case", "if anything", "all in all", "to my mind",
)
SIGNOFFS: tuple[str, ...] = (
    "That is all from me.", "Just my two cents.", "Over and out.", "More reviews soon.", "See you at the movies.",
    "Back to the couch.", "Make of that what you will.", "Your mileage may vary.", "Until next time.",
)
OCCASIONS: tuple[str, ...] = (
    "last weekend", "on a Sunday evening", "on a long flight", "at a late screening", "at an arthouse cinema",
    "on opening night", "on a Tuesday afternoon", "at a drive-in", "on a school night", "in late December",
    "on a small laptop screen", "in a half-full theater", "at a packed midnight show",
)
COMPANIONS: tuple[str, ...] = (
    "my brother", "my sister", "my parents", "my roommate", "a few coworkers", "my grandmother", "my kids",
    "my neighbor", "an old classmate", "my book club", "my partner", "my cousin", "my uncle",
)
AUDIENCES: tuple[str, ...] = (
    "anyone into a slow burn", "families", "fans of the director", "teenagers", "film students",
    "anyone with two hours to spare", "people who read the book", "older viewers", "fans of the genre",
    "anyone looking for a date movie", "my coworkers", "weekend viewers", "anyone who grew up in the nineties",
)
TIME_POINTS: tuple[str, ...] = (
    "end", "halfway point", "final scene", "second hour", "last act", "closing scene", "first twist",
    "fortieth minute", "intermission",
)
WHEN: tuple[str, ...] = (
    "last spring", "this summer", "in the fall", "a few weeks ago", "earlier this year", "over the winter",
    "last month", "on its first weekend",
)
RELATIVES: tuple[str, ...] = (
    "mother", "father", "aunt", "coworker", "barber", "dentist", "neighbor", "landlord",
)
MINUTES: tuple[str, ...] = (
    "about ninety minutes", "a little over a hundred minutes", "just under two hours", "almost three hours",
    "barely eighty minutes",
)
SCORES_WORDS: tuple[str, ...] = (
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
)

# fmt: on

# --------------------------------------------------------------------------------------------------------------
# Catalogue and styles


@dataclass(frozen=True)
class Movie:
    """One invented movie: everything a review may mention about it."""

    title: str
    genre: str
    year: int
    director: str
    lead: str
    costar: str
    character: str
    """The lead character as described in a premise, e.g. 'a retired detective'."""
    goal: str
    """The premise's relative clause, e.g. 'who follows a trail of coded messages'."""
    place: str
    other_title: str
    """Another catalogue title, for comparisons."""


def person_name(rng: random.Random) -> str:
    """A made-up full name: one of ~150 first names and ~1,500 combinatorial surnames."""
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(_SURNAME_HEADS)}{rng.choice(_SURNAME_TAILS)}"


def movie_title(rng: random.Random) -> str:
    """A made-up title from one of seven title shapes."""
    shape = rng.randrange(7)
    if shape == 0:
        return f"The {rng.choice(TITLE_ADJ)} {rng.choice(TITLE_NOUNS)}"
    if shape == 1:
        return f"{rng.choice(TITLE_NOUNS)} of the {rng.choice(TITLE_NOUNS)}"
    if shape == 2:
        return f"{rng.choice(FIRST_NAMES)} and the {rng.choice(TITLE_NOUNS)}"
    if shape == 3:
        return f"{rng.choice(TITLE_ADJ)} {rng.choice(TITLE_NOUNS)}"
    if shape == 4:
        return f"The {rng.choice(TITLE_NOUNS)} at {rng.choice(_SURNAME_HEADS)}{rng.choice(_SURNAME_TAILS)}"
    if shape == 5:
        return f"{rng.choice(FIRST_NAMES)}'s {rng.choice(TITLE_NOUNS)}"
    return f"{rng.choice(TITLE_NOUNS)} {rng.randint(2, 4)}"


def make_catalogue(size: int, *, seed: int) -> list[Movie]:
    """``size`` invented movies, the same for the same seed (shared by the public corpus and the private users)."""
    rng = random.Random(f"catalogue:{seed}")
    titles = [movie_title(rng) for _ in range(size)]
    genres = sorted(GENRES)
    movies = []
    for i, title in enumerate(titles):
        genre = rng.choice(genres)
        spec = GENRES[genre]
        movies.append(
            Movie(
                title=title,
                genre=genre,
                year=rng.randint(1962, 2024),
                director=person_name(rng),
                lead=person_name(rng),
                costar=person_name(rng),
                character=rng.choice(spec["characters"]),
                goal=rng.choice(spec["goals"]),
                place=rng.choice(PLACES),
                other_title=titles[(i + 1 + rng.randrange(size - 1)) % size] if size > 1 else title,
            )
        )
    return movies


@dataclass(frozen=True)
class UserStyle:
    """One author's writing habits. All rates are probabilities per sentence."""

    exclaim_rate: float
    ellipsis_rate: float
    hedge_rate: float
    first_person_rate: float
    booster_rate: float
    dampener_rate: float
    phrase_rate: float
    favourite_phrases: tuple[str, ...]
    preferred_pos: tuple[str, ...]
    """Positive adjectives this author reaches for first."""
    preferred_neg: tuple[str, ...]
    """Negative adjectives this author reaches for first."""
    favourite_genres: tuple[str, ...]
    min_sentences: int
    max_sentences: int
    sentiment_bias: float
    """Added to each review's sentiment target (clipped to [-1, 1]); a grumpy or generous author."""
    signoff: str
    """A closing line this author sometimes adds ('' for none)."""
    signoff_rate: float


def random_style(rng: random.Random, *, min_sentences: int = 3, max_sentences: int = 8) -> UserStyle:
    """A random author style; review lengths fall inside [min_sentences, max_sentences]."""
    lo = rng.randint(min_sentences, max(min_sentences, (min_sentences + max_sentences) // 2))
    hi = rng.randint(lo, max_sentences)
    return UserStyle(
        exclaim_rate=rng.choice((0.0, 0.0, 0.05, 0.15, 0.4)),
        ellipsis_rate=rng.choice((0.0, 0.0, 0.0, 0.1, 0.25)),
        hedge_rate=rng.choice((0.0, 0.05, 0.15, 0.35)),
        first_person_rate=rng.choice((0.1, 0.3, 0.5, 0.8)),
        booster_rate=rng.choice((0.1, 0.3, 0.6)),
        dampener_rate=rng.choice((0.0, 0.05, 0.2)),
        phrase_rate=rng.choice((0.0, 0.1, 0.25)),
        favourite_phrases=tuple(rng.sample(FAVOURITE_PHRASES, 2)),
        preferred_pos=tuple(rng.sample(POS_ADJ, 6)),
        preferred_neg=tuple(rng.sample(NEG_ADJ, 6)),
        favourite_genres=tuple(rng.sample(sorted(GENRES), 3)),
        min_sentences=lo,
        max_sentences=hi,
        sentiment_bias=round(rng.gauss(0.0, 0.35), 3),
        signoff=rng.choice(SIGNOFFS) if rng.random() < 0.3 else "",
        signoff_rate=rng.choice((0.3, 0.7, 1.0)),
    )


def public_style(rng: random.Random, *, min_sentences: int = 3, max_sentences: int = 8) -> UserStyle:
    """A style for a one-off public author: as varied as a private user's, but with no sentiment bias."""
    style = random_style(rng, min_sentences=min_sentences, max_sentences=max_sentences)
    return UserStyle(**{**style.__dict__, "sentiment_bias": 0.0})


# --------------------------------------------------------------------------------------------------------------
# Sentences


@dataclass(frozen=True)
class Review:
    """A generated review: its text, its sentences and what was intended."""

    text: str
    sentences: tuple[str, ...]
    shapes: tuple[str, ...]
    """The grammar shape of each sentence (for diversity checks)."""
    target: float
    """The intended sentiment in [-1, 1] (after the author's bias)."""
    title: str
    genre: str


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _a(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


class _Writer:
    """Draws the words of one review: a style, a movie, a sentiment target and an RNG."""

    def __init__(self, rng: random.Random, style: UserStyle, movie: Movie, target: float) -> None:
        self.rng, self.style, self.movie, self.target = rng, style, movie, target

    # word choices -------------------------------------------------------------------------------------------
    def adj(self, pol: int) -> str:
        preferred = self.style.preferred_pos if pol > 0 else self.style.preferred_neg
        r = self.rng.random()
        word = self.rng.choice(preferred) if r < 0.4 else self.rng.choice(POS_ADJ if pol > 0 else NEG_ADJ)
        if r > 0.88:  # a lexicon word carries the sentiment; the flavour word only enriches the text
            return f"{word} and {self.rng.choice(POS_FLAVOUR if pol > 0 else NEG_FLAVOUR)}"
        return word

    def adv(self) -> str:
        """An intensity modifier (with its trailing space) or ''."""
        r = self.rng.random()
        if r < self.style.booster_rate * (0.4 + 0.6 * abs(self.target)):
            return self.rng.choice(BOOSTERS) + " "
        if r > 1.0 - self.style.dampener_rate:
            return self.rng.choice(DAMPENERS) + " "
        return ""

    def pick(self, options: Sequence[str]) -> str:
        return self.rng.choice(options)

    def aspect(self) -> str:
        return self.rng.choice(ASPECTS)

    def two_aspects(self) -> tuple[str, str]:
        a, b = self.rng.sample(ASPECTS, 2)
        return a, b

    def it(self) -> str:
        return self.rng.choice(("the film", "the movie", "it", "this one", self.movie.title))

    def noun(self, pol: int) -> str:
        return self.rng.choice(POS_NOUNS if pol > 0 else NEG_NOUNS)


def _openers(w: _Writer) -> list[tuple[str, str]]:
    m = w.movie
    return [
        ("open_watched", f"I watched {m.title} {w.pick(OCCASIONS)} with {w.pick(COMPANIONS)}."),
        ("open_directed", f"{m.title} is a {m.year} {m.genre} directed by {m.director}."),
        ("open_setting", f"Set in {m.place}, {m.title} follows {m.character} {m.goal}."),
        ("open_stars", f"{m.director}'s {m.genre} {m.title} stars {m.lead} as {m.character} {m.goal}."),
        ("open_knowing", f"I went into {m.title} knowing very little about the story."),
        ("open_finally", f"After hearing so much about {m.title}, I finally saw it {w.pick(OCCASIONS)}."),
        ("open_new", f"The new {m.genre} from {m.director}, {m.title}, opened {w.pick(WHEN)}."),
        ("open_tells", f"{m.title} tells the story of {m.character} {m.goal}."),
        (
            "open_relative",
            f"My {w.pick(RELATIVES)} told me about {m.title} {w.pick(WHEN)}, so I gave it a try.",
        ),
        ("open_buzz", f"Few {m.genre}s this year have arrived with as much buzz as {m.title}."),
        (
            "open_years",
            f"It has been years since {m.director} made {_a(m.genre)}, and {m.title} is the result.",
        ),
        ("open_so", f"So, {m.title}, the {m.genre} everyone at work keeps talking about."),
        ("open_second", f"This was my second time watching {m.title}, and I noticed a lot more."),
        (
            "open_casting",
            f"{m.lead} and {m.costar} share the screen in {m.title}, {_a(m.genre)} set in {m.place}.",
        ),
    ]


def _opinion(w: _Writer, pol: int) -> tuple[str, str]:
    """One sentence whose overall polarity is ``pol`` (+1 or -1); some shapes mix in the other polarity."""
    m, rng = w.movie, w.rng
    a, b = w.two_aspects()
    first = rng.random() < w.style.first_person_rate
    shape = rng.randrange(30)
    if shape == 0:
        if first:
            return "found_aspect", f"I found {a} {w.adv()}{w.adj(pol)}."
        return "aspect_is", f"{_cap(a)} is {w.adv()}{w.adj(pol)}."
    if shape == 1:
        return "lead_perf", f"{m.lead} gives {_a(w.adv() + w.adj(pol))} performance as {m.character}."
    if shape == 2:
        verbs = POS_1P_VERBS if pol > 0 else NEG_1P_VERBS
        return "i_verb_way", f"I {w.pick(verbs)} the way {a} {w.pick(('handles', 'builds', 'shapes'))} {b}."
    if shape == 3:
        c = rng.choice([x for x in ASPECTS if x not in (a, b)])
        return "list_all", f"{_cap(a)}, {b} and {c} are all {w.adv()}{w.adj(pol)}."
    if shape == 4:
        return "contrast_but", f"{_cap(a)} is {w.adj(-pol)}, but {b} is {w.adv()}{w.adj(pol)}."
    if shape == 5:
        return "although", f"Although {a} is {w.adj(-pol)}, {b} is {w.adv()}{w.adj(pol)}."
    if shape == 6:
        more = rng.choice(("more", "far more", "much more", "a lot more"))
        return "compare_other", f"It is {more} {w.adj(pol)} than {m.other_title}."
    if shape == 7:
        return "compare_director", (
            f"Compared to {m.director}'s earlier work, this one feels {w.adv()}{w.adj(pol)}."
        )
    if shape == 8:
        if pol > 0:
            return "question_pos", f"Who could resist such {_a(w.adj(pol))} {w.pick(FILM_NOUNS)}?"
        return "question_neg", f"Why is {a} so {w.adj(pol)}?"
    if shape == 9:
        if pol > 0:
            return "question_best", f"Has there been a more {w.adj(pol)} {m.genre} this decade?"
        return "question_who", f"Who thought {a} this {w.adj(pol)} would work?"
    if shape == 10:
        return "what_a", f"What {_a(w.adj(pol))} {w.pick(FILM_NOUNS)}!"
    if shape == 11:
        return "because", f"Because {a} is so {w.adj(pol)}, {b} feels {w.adj(pol)} too."
    if shape == 12:
        feel = POS_FEEL if pol > 0 else NEG_FEEL
        return "by_time", f"By the {w.pick(TIME_POINTS)}, I was {w.adv()}{w.pick(feel)}."
    if shape == 13:
        feel = POS_FEEL if pol > 0 else NEG_FEEL
        event = rng.choice(GENRES[m.genre]["events"])
        return (
            "when_event",
            f"When the {m.character.split(' ', 1)[1]} {event}, I felt {w.adv()}{w.pick(feel)}.",
        )
    if shape == 14:
        manner = POS_MANNER if pol > 0 else NEG_MANNER
        return "director_manner", f"{m.director} handles {a} {w.pick(manner)}."
    if shape == 15:
        verbs = POS_VERBS if pol > 0 else NEG_VERBS
        where = w.pick(
            (
                "in the quieter scenes",
                "in the big moments",
                "from the first frame",
                "in the last act",
                "whenever the camera lingers",
                "in the scenes set in " + m.place,
            )
        )
        return "aspect_verb", f"{_cap(a)} {w.pick(verbs)} {where}."
    if shape == 16:
        span = w.pick(
            (
                "from start to finish",
                "from the first scene to the last",
                "for most of its runtime",
                "in almost every way",
                "by any measure",
            )
        )
        return "it_is_noun", f"{_cap(w.it())} is {w.noun(pol)} {span}."
    if shape == 17:
        if pol > 0:
            return "not_negated", f"{_cap(a)} is not {w.adj(-1)} at all."
        return "nothing_about", f"There is nothing {w.adj(1)} about {a}."
    if shape == 18:
        if pol > 0:
            return "even_minor", f"Even {a} is {w.adv()}{w.adj(pol)}."
        return "not_even", f"Not even {m.lead} can save {a}, which is {w.adv()}{w.adj(pol)}."
    if shape == 19:
        fans = w.pick(("Fans of", "Anyone who loves", "People who grew up on", "Newcomers to"))
        return "fans_of", f"{fans} {m.genre}s will find it {w.adv()}{w.adj(pol)}."
    if shape == 20:
        return "alone_makes", f"{_cap(a)} alone makes it {w.adv()}{w.adj(pol)}."
    if shape == 21:
        event = rng.choice(GENRES[m.genre]["events"])
        who = m.character.split(" ", 1)[1]
        return "scene_in_which", f"The scene in which the {who} {event} is {w.adv()}{w.adj(pol)}."
    if shape == 22:
        return "chemistry", f"The chemistry between {m.lead} and {m.costar} is {w.adv()}{w.adj(pol)}."
    if shape == 23:
        reactions = POS_REACTIONS if pol > 0 else NEG_REACTIONS
        return "reaction", f"I {w.pick(reactions)} more than once, {w.pick(('honestly', 'truly', 'really'))}."
    if shape == 24:
        return "semicolon", f"{_cap(a)} is {w.adj(pol)}; {b} is even more {w.adj(pol)}."
    if shape == 25:
        aside = w.pick(("to my surprise", "as expected", "of all things", "oddly enough", "in particular"))
        return "parenthetical", f"{_cap(a)}, {aside}, is {w.adv()}{w.adj(pol)}."
    if shape == 26:
        x, y = w.adj(pol), w.adj(pol)
        return "dash_pair", f"{_cap(a)} is {x} and {y}, and {b} is {w.pick(NEUTRAL_ADJ)}."
    if shape == 27:
        verb = w.pick(("kept me", "left me", "made me feel"))
        feel = POS_FEEL if pol > 0 else NEG_FEEL
        return (
            "kept_me",
            f"{_cap(w.it())} {verb} {w.adv()}{w.pick(feel)} {w.pick(('throughout', 'for days', 'the whole time', 'at the end'))}.",
        )
    if shape == 28:
        if first:
            return "i_cannot", (
                f"I cannot remember the last time {_a(m.genre)} was this {w.adj(pol)}."
                if pol > 0
                else f"I cannot believe how {w.adj(pol)} {a} turned out."
            )
        return (
            "rarely",
            f"Rarely has {a} felt so {w.adj(pol)}." if pol < 0 else f"Seldom is {a} this {w.adj(-1)}.",
        )
    return "while_compound", (
        f"While {m.lead} is {w.adj(pol)} as always, {m.costar} is {w.adv()}{w.adj(pol)} as well."
    )


def _neutral(w: _Writer) -> tuple[str, str]:
    m, rng = w.movie, w.rng
    shapes = [
        ("plays", f"{m.costar} plays {_a(w.pick(NEUTRAL_ADJ))} neighbor who keeps turning up at odd hours."),
        ("runtime", f"The film runs {w.pick(MINUTES)}."),
        ("shot_in", f"It was shot in {w.pick(PLACES)}, standing in for {m.place}."),
        (
            "story_over",
            f"The story takes place over {w.pick(('one night', 'a single summer', 'three days', 'ten years', 'a week'))}.",
        ),
        (
            "style_is",
            f"The style is {w.pick(NEUTRAL_ADJ)} and {w.pick(NEUTRAL_ADJ)}, with a lot of {w.pick(('close-ups', 'long takes', 'wide shots', 'voice-over', 'archival footage'))}.",
        ),
        ("plot_recap", f"Most of the action follows {m.character} {m.goal}."),
        (
            "based_on",
            f"It is based on a {w.pick(('novel', 'short story', 'play', 'true story', 'comic book'))} from the {w.pick(('fifties', 'sixties', 'eighties', 'nineties'))}.",
        ),
        ("director_prior", f"{m.director} also wrote the script, with help from {person_name(rng)}."),
        ("subtitles", f"I saw the {w.pick(('subtitled', 'dubbed', 'extended', 'original'))} version."),
        (
            "event_recap",
            f"At one point the {m.character.split(' ', 1)[1]} {rng.choice(GENRES[m.genre]['events'])}.",
        ),
    ]
    return rng.choice(shapes)


def _closer(w: _Writer, pol: int) -> tuple[str, str]:
    m, rng = w.movie, w.rng
    if pol == 0:
        return rng.choice(
            [
                ("close_mixed", f"Overall, {w.adj(1)} in places and {w.adj(-1)} in others."),
                ("close_score", f"{_cap(w.pick(SCORES_WORDS[3:7]))} out of ten."),
                ("close_depends", f"Whether you will like it depends on how you feel about {m.genre}s."),
            ]
        )
    score = SCORES_WORDS[rng.randint(6, 9)] if pol > 0 else SCORES_WORDS[rng.randint(0, 3)]
    options = [
        ("close_score", f"{_cap(score)} out of ten."),
        ("close_overall", f"Overall, {_a(w.adv() + w.adj(pol))} {w.pick(FILM_NOUNS)}."),
        ("close_in_the_end", f"In the end, {m.title} is {w.noun(pol)}."),
    ]
    if pol > 0:
        options += [
            (
                "close_recommend",
                f"I would {w.pick(('definitely', 'happily', 'gladly'))} recommend it to {w.pick(AUDIENCES)}.",
            ),
            (
                "close_see_it",
                f"See it {w.pick(('on the biggest screen you can find', 'as soon as you can', 'with friends'))}.",
            ),
        ]
    else:
        options += [
            ("close_not_recommend", f"I would not recommend it to {w.pick(AUDIENCES)}."),
            ("close_skip", f"Skip it and watch {m.other_title} instead, it is far less {w.adj(-1)}."),
        ]
    return rng.choice(options)


# Sentence-initial words that may be lowercased after a hedge or phrase (names and titles keep their capitals).
_LOWERABLE = frozenset(
    "The It This A An Even Not There What Who Why Because By When Although Compared Fans Anyone People "
    "Newcomers Rarely Seldom While Most At Overall, In Has So, Few".split()
)
# Shapes that read wrongly behind a hedge ("I think see it ...").
_NO_HEDGE = frozenset({"close_see_it", "close_skip", "close_score", "what_a", "signoff"})


def _lower_first(sentence: str) -> str:
    first = sentence.split(" ", 1)[0]
    return sentence[:1].lower() + sentence[1:] if first in _LOWERABLE else sentence


def _decorate(w: _Writer, shape: str, sentence: str, *, allow_hedge: bool) -> str:
    """Apply the author's habits to one sentence: hedges, favourite phrases, exclamations, ellipses."""
    rng, style = w.rng, w.style
    allow_hedge = allow_hedge and shape not in _NO_HEDGE
    if allow_hedge and rng.random() < style.hedge_rate and sentence[-1] == ".":
        sentence = f"{rng.choice(HEDGES)} {_lower_first(sentence)}"
    elif allow_hedge and rng.random() < style.phrase_rate:
        phrase = rng.choice(style.favourite_phrases)
        if rng.random() < 0.5 and sentence[-1] == ".":
            sentence = f"{sentence[:-1]}, {phrase}."
        else:
            sentence = f"{_cap(phrase)}, {_lower_first(sentence)}"
    if sentence[-1] == ".":
        r = rng.random()
        if r < style.exclaim_rate:
            sentence = sentence[:-1] + rng.choice(("!", "!", "!!"))
        elif r > 1.0 - style.ellipsis_rate:
            sentence = sentence[:-1] + "..."
    return sentence


def _sign(rng: random.Random, target: float) -> int:
    """+1 with probability (1 + target) / 2, else -1."""
    return 1 if rng.random() < 0.5 * (1.0 + target) else -1


def write_review(rng: random.Random, *, style: UserStyle, movie: Movie, sentiment: float) -> Review:
    """One review of ``movie`` by an author with ``style`` and an intended sentiment in [-1, 1].

    The first sentence is an opener (mostly neutral: it names the movie), then opinion sentences mixed with a few
    neutral ones, then a verdict whose polarity follows the target (a mixed verdict near 0).
    """
    if not -1.0 <= sentiment <= 1.0:
        raise ValueError(f"sentiment must be in [-1, 1], got {sentiment}")
    target = max(-1.0, min(1.0, sentiment + style.sentiment_bias))
    w = _Writer(rng, style, movie, target)
    n = rng.randint(style.min_sentences, style.max_sentences)
    pairs: list[tuple[str, str]] = [rng.choice(_openers(w))]
    for _ in range(max(0, n - 2)):
        if rng.random() < 0.18:
            pairs.append(_neutral(w))
        else:
            pairs.append(_opinion(w, _sign(rng, target)))
    if n >= 2:
        verdict = 0 if abs(target) < 0.2 and rng.random() < 0.5 else (1 if target >= 0 else -1)
        pairs.append(_closer(w, verdict))
    sentences = [_decorate(w, shape, s, allow_hedge=i > 0) for i, (shape, s) in enumerate(pairs)]
    if style.signoff and rng.random() < style.signoff_rate:
        sentences.append(style.signoff)
        pairs.append(("signoff", style.signoff))
    return Review(
        text=" ".join(sentences),
        sentences=tuple(sentences),
        shapes=tuple(shape for shape, _ in pairs),
        target=target,
        title=movie.title,
        genre=movie.genre,
    )


class ReviewGenerator:
    """Reviews of a fixed movie catalogue; every call takes the RNG that makes it reproducible.

    Args:
        seed: seeds the catalogue (titles, people, premises).
        catalogue_size: number of invented movies.
        min_sentences / max_sentences: bounds on review length (each author picks a sub-range).
    """

    def __init__(
        self, *, seed: int, catalogue_size: int = 600, min_sentences: int = 3, max_sentences: int = 8
    ) -> None:
        if not 2 <= min_sentences <= max_sentences:
            raise ValueError(
                f"need 2 <= min_sentences <= max_sentences, got {min_sentences}, {max_sentences}"
            )
        if catalogue_size < 2:
            raise ValueError(f"catalogue_size must be >= 2, got {catalogue_size}")
        self.movies = make_catalogue(catalogue_size, seed=seed)
        self.min_sentences, self.max_sentences = min_sentences, max_sentences
        self._by_genre: dict[str, list[Movie]] = {}
        for movie in self.movies:
            self._by_genre.setdefault(movie.genre, []).append(movie)

    def style(self, rng: random.Random, *, public: bool = False) -> UserStyle:
        """A random author style within this generator's length bounds."""
        make = public_style if public else random_style
        return make(rng, min_sentences=self.min_sentences, max_sentences=self.max_sentences)

    def movie(self, rng: random.Random, style: UserStyle) -> Movie:
        """A movie this author would review: one of their favourite genres 60% of the time."""
        if rng.random() < 0.6:
            pool = [m for g in style.favourite_genres for m in self._by_genre.get(g, ())]
            if pool:
                return rng.choice(pool)
        return rng.choice(self.movies)

    def review(
        self, rng: random.Random, *, style: UserStyle, sentiment: float, movie: Movie | None = None
    ) -> Review:
        """One review with the given style and intended sentiment (movie drawn from the style if not given)."""
        return write_review(rng, style=style, movie=movie or self.movie(rng, style), sentiment=sentiment)

    def rewrite(self, rng: random.Random, review: Review, *, style: UserStyle) -> Review:
        """The same opening sentence and movie, the rest rewritten with an independent sentiment draw (the other
        side of a preference pair)."""
        movie = next(m for m in self.movies if m.title == review.title and m.genre == review.genre)
        other = self.review(rng, style=style, sentiment=rng.uniform(-1.0, 1.0), movie=movie)
        sentences = (review.sentences[0],) + other.sentences[1:]
        return Review(
            text=" ".join(sentences),
            sentences=sentences,
            shapes=(review.shapes[0],) + other.shapes[1:],
            target=other.target,
            title=review.title,
            genre=review.genre,
        )
