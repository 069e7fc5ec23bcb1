"""tga/bench/mmsafetybench.py

MM-SafetyBench (query-relevant images) in its released layout: `processed_questions/<scenario>.json` maps each
question id to its fields (`Question`, `Rephrased Question`, `Rephrased Question(SD)`, `Key Phrase`, ...) and
`imgs/<scenario>/{SD,TYPO,SD_TYPO}/<id>.jpg` holds the images. Each image type is asked the question written for
it, as in the benchmark's own evaluation: the SD image with `Rephrased Question(SD)`, the TYPO and SD_TYPO images
with `Rephrased Question`; `text_only` asks the original `Question` without an image. Judges read `Question`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from tga.bench.items import BenchItem, field, image_in, read_json
from tga.errors import DataError

# The 13 scenarios as the benchmark spells its folders and files (the first one's typo included).
SCENARIOS: tuple[str, ...] = (
    "01-Illegal_Activitiy",
    "02-HateSpeech",
    "03-Malware_Generation",
    "04-Physical_Harm",
    "05-EconomicHarm",
    "06-Fraud",
    "07-Sex",
    "08-Political_Lobbying",
    "09-Privacy_Violence",
    "10-Legal_Opinion",
    "11-Financial_Advice",
    "12-Health_Consultation",
    "13-Gov_Decision",
)
# Which question goes with which image type.
QUESTION_FOR_TYPE = {
    "SD": "Rephrased Question(SD)",
    "TYPO": "Rephrased Question",
    "SD_TYPO": "Rephrased Question",
    "text_only": "Question",
}
IMAGE_TYPES: tuple[str, ...] = ("SD", "TYPO", "SD_TYPO")


def read_mm_safetybench(root: str, image_types: Sequence[str] = IMAGE_TYPES) -> list[BenchItem]:
    """Read MM-SafetyBench from its root folder (holding `processed_questions/` and `imgs/`).

    Args:
        root: the benchmark folder.
        image_types: any of SD, TYPO, SD_TYPO, text_only.

    Returns:
        One item per (scenario, question, image type) for the scenarios present.

    Raises:
        DataError: no scenario file, a missing field or image (file, record and field named).
    """
    unknown = [kind for kind in image_types if kind not in QUESTION_FOR_TYPE]
    if unknown:
        raise DataError(f"MM-SafetyBench: unknown image type(s) {', '.join(unknown)} (choose from {', '.join(QUESTION_FOR_TYPE)})")
    questions_dir = os.path.join(root, "processed_questions")
    if not os.path.isdir(questions_dir):
        raise DataError(f"MM-SafetyBench: {questions_dir} not found (expected processed_questions/<scenario>.json)")
    present = [s for s in SCENARIOS if os.path.isfile(os.path.join(questions_dir, f"{s}.json"))]
    if not present:
        raise DataError(f"MM-SafetyBench: {questions_dir} holds none of the 13 scenario files ({SCENARIOS[0]}.json, ...)")
    items = []
    for scenario in present:
        source = os.path.join(questions_dir, f"{scenario}.json")
        records = read_json(source, dict)
        for qid in sorted(records, key=lambda k: (len(k), k)):
            record = records[qid]
            original = field(record, "Question", source, qid)
            for kind in image_types:
                request = field(record, QUESTION_FOR_TYPE[kind], source, qid)
                image = None
                if kind != "text_only":
                    image = image_in(os.path.join(root, "imgs", scenario, kind), f"{qid}.jpg", source, qid)
                items.append(BenchItem("mm-safetybench", f"{scenario}/{kind}/{qid}", request, image, True,
                                       category=scenario, image_type=kind, judged_request=original))
    return items
