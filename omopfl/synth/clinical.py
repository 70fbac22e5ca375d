"""The clinical CDM tables of one chunk of synthetic persons (everything but labs, specimens and images).

Part of the synthetic generator (:mod:`omopfl.synth`).  Each function draws from the chunk's random
stream (:class:`omopfl.synth.rows.ChunkContext`); :func:`omopfl.synth.chunk.build_chunk` calls them in
a fixed order, which is part of what makes the rows reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from omopfl import vocab
from omopfl.synth.concepts import (
    AMI,
    ATORVASTATIN,
    CHEST_XRAY,
    CKD,
    CKD5,
    DIABETES_UNSPECIFIED,
    ECG,
    EHR,
    FEMALE,
    HF_CODE_P,
    HF_CODES,
    HYPERLIPIDEMIA,
    HYPERTENSION,
    INSULIN_GLARGINE,
    LAB_TYPE,
    LISINOPRIL,
    MALE,
    METFORMIN,
    MRI,
    OBESITY,
    PRESCRIPTION,
    SMOKER,
    T1DM,
    T2DM_CODE_P,
    T2DM_CODES,
    TACHYCARDIA,
    source_codes,
)
from omopfl.synth.people import DATA_END, OUTCOME_WINDOW, sigmoid, uniform_days
from omopfl.synth.rows import ChunkContext, RowBlocks

__all__ = [
    "Visits",
    "add_domain_rows",
    "conditions",
    "deaths",
    "drugs",
    "observation_periods",
    "observations",
    "persons",
    "procedures",
    "visits",
]


def persons(ctx: ChunkContext) -> pd.DataFrame:
    """The ``person`` rows."""
    rng, n, people = ctx.rng, ctx.n, ctx.people
    pid, male, birth, race, hispanic = people.pid, people.male, people.birth, people.race, people.hispanic
    return pd.DataFrame({
        "person_id": pid,
        "gender_concept_id": np.where(male, MALE, FEMALE),
        "year_of_birth": birth.astype("datetime64[D]").astype("datetime64[Y]").astype(np.int64) + 1970,
        "month_of_birth": birth.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64) % 12 + 1,
        "day_of_birth": (birth.astype("datetime64[D]") - birth.astype("datetime64[D]").astype("datetime64[M]"))
        .astype(np.int64) + 1,
        "race_concept_id": race,
        "ethnicity_concept_id": np.where(hispanic, 38003563, 38003564),
        "location_id": rng.integers(1, 4, n),
        "care_site_id": rng.integers(1, 4, n),
        "provider_id": rng.integers(1, 21, n),
        "gender_source_value": np.where(male, "M", "F").astype(object),
        "race_source_value": source_codes(race),
    })


def observation_periods(ctx: ChunkContext) -> pd.DataFrame:
    """One ``observation_period`` row per person."""
    people, n = ctx.people, ctx.n
    return pd.DataFrame({
        "observation_period_id": ctx.next_ids("observation_period", n) + np.arange(n),
        "person_id": people.pid,
        "observation_period_start_date": people.obs_start.astype("datetime64[D]"),
        "observation_period_end_date": people.obs_end.astype("datetime64[D]"),
        "period_type_concept_id": EHR,
    })


@dataclass
class Visits:
    """The ``visit_occurrence`` rows, and the visits and days the outcome rows refer to."""

    frame: pd.DataFrame
    index_visit_id: np.ndarray  # the outpatient visit at each diabetic person's index date
    cases: np.ndarray  # chunk-local persons with the outcome
    hf_day: np.ndarray  # their outcome day
    hf_visit_id: np.ndarray  # their admission


def visits(ctx: ChunkContext, care_site: np.ndarray) -> Visits:
    """Background visits, one outpatient visit at each diabetic index date, one admission per outcome.

    ``care_site`` is each person's ``care_site_id`` (the visit's).
    """
    rng, p, n, people = ctx.rng, ctx.profile, ctx.n, ctx.people
    obs_start, obs_end, index = people.obs_start, people.obs_end, people.index
    idx = np.arange(n)
    visits = RowBlocks()
    n_visits = 1 + rng.poisson(p.visit_rate, n)
    vp = np.repeat(idx, n_visits)
    vstart = ctx.uniform(obs_start[vp], obs_end[vp])
    vconcept = rng.choice(np.array([9202, 9203, 9201]), size=len(vp), p=np.array([0.85, 0.10, 0.05]))
    vend = np.minimum(vstart + np.where(vconcept == 9201, rng.integers(1, 11, len(vp)), 0), obs_end[vp])
    visits.add(vp, visit_concept_id=vconcept, visit_start_date=vstart, visit_end_date=vend)
    diabetic = np.flatnonzero(people.t2dm)
    index_visit_at = visits.add(diabetic, visit_concept_id=9202, visit_start_date=index[diabetic],
                                visit_end_date=index[diabetic])
    cases = np.flatnonzero(people.outcome)
    hf_day = index[cases] + rng.integers(OUTCOME_WINDOW[0], OUTCOME_WINDOW[1] + 1, len(cases))
    hf_end = np.minimum(hf_day + rng.integers(2, 12, len(cases)), obs_end[cases])
    hf_visit_at = visits.add(cases, visit_concept_id=9201, visit_start_date=hf_day, visit_end_date=hf_end)
    visit_frame, visit_rank = visits.build(
        "visit_occurrence_id", ctx.ids["visit_occurrence"], ctx.first_person_id, "visit_start_date",
        ("visit_start_date", "visit_end_date"))
    ctx.next_ids("visit_occurrence", len(visit_frame))
    visit_frame["visit_type_concept_id"] = EHR
    visit_frame["care_site_id"] = care_site[visit_frame["person_id"].to_numpy() - ctx.first_person_id]
    visit_frame["visit_source_value"] = source_codes(visit_frame["visit_concept_id"].to_numpy())
    first_visit = int(visit_frame["visit_occurrence_id"].iloc[0]) if len(visit_frame) else 0
    index_visit_id = first_visit + visit_rank[index_visit_at:index_visit_at + len(diabetic)]
    hf_visit_id = first_visit + visit_rank[hf_visit_at:hf_visit_at + len(cases)]
    return Visits(visit_frame, index_visit_id, cases, hf_day, hf_visit_id)


def conditions(ctx: ChunkContext, index_visit_id: np.ndarray, cases: np.ndarray, hf_day: np.ndarray,
               hf_visit_id: np.ndarray) -> pd.DataFrame:
    """Diabetes (the index record and follow-ups), heart failure (outcomes, distractors, background),
    comorbidities, and the planted outside-observation and unmapped rows."""
    rng, n, pp = ctx.rng, ctx.n, ctx.people
    obs_start, obs_end, t2dm, t1dm, index = pp.obs_start, pp.obs_end, pp.t2dm, pp.t1dm, pp.index
    outcome = pp.outcome
    age_index, bmi = pp.age_index, pp.bmi
    diabetic = np.flatnonzero(t2dm)
    rows = RowBlocks()

    def codes(choices: np.ndarray, probs: np.ndarray, size: int) -> np.ndarray:
        return rng.choice(choices, size=size, p=probs)

    # Type 2 diabetes: the first record is the index date; follow-up records come later.
    rows.add(diabetic, condition_concept_id=codes(T2DM_CODES, T2DM_CODE_P, len(diabetic)),
             condition_start_date=index[diabetic], visit_occurrence_id=index_visit_id)
    repeats = rng.integers(0, 4, len(diabetic))
    fp = np.repeat(diabetic, repeats)
    rows.add(fp, condition_concept_id=codes(T2DM_CODES, T2DM_CODE_P, len(fp)),
             condition_start_date=ctx.uniform(index[fp] + 1, obs_end[fp]))
    # Heart failure: outcomes inside the window, distractors outside it, background in non-diabetics.
    rows.add(cases, condition_concept_id=codes(HF_CODES, HF_CODE_P, len(cases)), condition_start_date=hf_day,
             visit_occurrence_id=hf_visit_id)
    controls = np.flatnonzero(t2dm & ~outcome)
    kind = rng.random(len(controls))
    same_day = controls[kind < 0.03]
    rows.add(same_day, condition_concept_id=codes(HF_CODES, HF_CODE_P, len(same_day)),
             condition_start_date=index[same_day])
    before = controls[(kind >= 0.03) & (kind < 0.06)]
    rows.add(before, condition_concept_id=codes(HF_CODES, HF_CODE_P, len(before)),
             condition_start_date=ctx.uniform(obs_start[before], index[before] - 1))
    late = controls[(kind >= 0.06) & (kind < 0.11)]
    late = late[obs_end[late] - index[late] > OUTCOME_WINDOW[1]]
    rows.add(late, condition_concept_id=codes(HF_CODES, HF_CODE_P, len(late)),
             condition_start_date=ctx.uniform(index[late] + OUTCOME_WINDOW[1] + 1, obs_end[late]))
    background_hf = np.flatnonzero(~t2dm & (rng.random(n) < sigmoid(-4.2 + 0.06 * (age_index - 55))))
    rows.add(background_hf, condition_concept_id=codes(HF_CODES, HF_CODE_P, len(background_hf)),
             condition_start_date=ctx.uniform(obs_start[background_hf], obs_end[background_hf]))
    # Comorbidities (before the index date of diabetic persons where they enter the outcome model).
    h = np.flatnonzero(pp.htn)
    rows.add(h, condition_concept_id=HYPERTENSION, condition_start_date=pp.htn_day[h])
    c = np.flatnonzero(pp.ckd)
    rows.add(c, condition_concept_id=CKD, condition_start_date=pp.ckd_day[c])
    c5 = c[rng.random(len(c)) < 0.1]
    rows.add(c5, condition_concept_id=CKD5, condition_start_date=np.minimum(pp.ckd_day[c5] + 200, obs_end[c5]))
    hl = np.flatnonzero(pp.hyperlipidemia)
    rows.add(hl, condition_concept_id=HYPERLIPIDEMIA, condition_start_date=pp.hl_day[hl])
    ob = np.flatnonzero((bmi >= 30) & (rng.random(n) < 0.6))
    rows.add(ob, condition_concept_id=OBESITY, condition_start_date=ctx.uniform(obs_start[ob], obs_end[ob]))
    mi = np.flatnonzero(rng.random(n) < sigmoid(-4.0 + 0.05 * (age_index - 55) + 0.5 * t2dm))
    rows.add(mi, condition_concept_id=AMI, condition_start_date=ctx.uniform(obs_start[mi], obs_end[mi]))
    t1 = np.repeat(np.flatnonzero(t1dm), 2)
    rows.add(t1, condition_concept_id=T1DM, condition_start_date=ctx.uniform(obs_start[t1], obs_end[t1]))
    dm = np.flatnonzero(~t2dm & ~t1dm & (rng.random(n) < 0.01))
    rows.add(dm, condition_concept_id=DIABETES_UNSPECIFIED,
             condition_start_date=ctx.uniform(obs_start[dm], obs_end[dm]))
    ta = np.flatnonzero(rng.random(n) < 0.05)
    rows.add(ta, condition_concept_id=TACHYCARDIA, condition_start_date=ctx.uniform(obs_start[ta], obs_end[ta]))
    # Planted dirt: a row outside the observation period, and unmapped rows (concept id 0).
    outside = ctx.outside_persons("condition_occurrence")
    rows.add(outside, condition_concept_id=TACHYCARDIA, condition_start_date=ctx.outside_day(outside))
    unmapped = ctx.unmapped_persons("condition_occurrence")
    rows.add(unmapped, condition_concept_id=0,
             condition_start_date=ctx.uniform(obs_start[unmapped], obs_end[unmapped]),
             condition_source_value="LOCAL-DX-7731")
    frame, _ = rows.build("condition_occurrence_id", ctx.ids["condition_occurrence"], ctx.first_person_id,
                          "condition_start_date", ("condition_start_date",))
    ctx.next_ids("condition_occurrence", len(frame))
    source = np.array(frame["condition_source_value"], dtype=object)
    missing = pd.isna(source)
    source[missing] = source_codes(frame["condition_concept_id"].to_numpy()[missing])
    frame["condition_source_value"] = source
    frame["condition_type_concept_id"] = EHR
    return frame


def drugs(ctx: ChunkContext) -> pd.DataFrame:
    """Metformin, insulin, lisinopril and atorvastatin fills (some coded at ingredient level), and planted rows."""
    rng, p, n, pp = ctx.rng, ctx.profile, ctx.n, ctx.people
    obs_start, obs_end, index, htn_day, hl_day = pp.obs_start, pp.obs_end, pp.index, pp.htn_day, pp.hl_day
    rows = RowBlocks()

    def exposures(persons: np.ndarray, drug: tuple[int, int], start: np.ndarray, max_fills: int,
                  supply: int) -> None:
        fills = rng.integers(1, max_fills + 1, len(persons))
        dp = np.repeat(persons, fills)
        within = np.arange(len(dp)) - np.repeat(np.cumsum(fills) - fills, fills)
        dstart = np.repeat(start, fills) + within * supply
        keep = dstart <= obs_end[dp]
        dp, dstart = dp[keep], dstart[keep]
        ingredient = rng.random(len(dp)) < p.drug_ingredient_share
        rows.add(dp, drug_concept_id=np.where(ingredient, drug[1], drug[0]), drug_exposure_start_date=dstart,
                 drug_exposure_end_date=np.minimum(dstart + supply - 1, obs_end[dp]), days_supply=supply,
                 quantity=float(supply))

    m = np.flatnonzero(pp.metformin)  # starts on or before the index date
    exposures(m, METFORMIN, np.maximum(index[m] - rng.integers(0, 181, len(m)), obs_start[m]), 8, 90)
    g = np.flatnonzero(pp.t2dm & (rng.random(n) < 0.15))  # insulin after the index date
    exposures(g, INSULIN_GLARGINE, index[g] + rng.integers(30, 301, len(g)), 4, 30)
    h = np.flatnonzero(pp.htn & (rng.random(n) < 0.6))
    exposures(h, LISINOPRIL, np.minimum(htn_day[h] + rng.integers(0, 61, len(h)), obs_end[h]), 6, 90)
    a = np.flatnonzero(pp.hyperlipidemia & (rng.random(n) < 0.55))
    exposures(a, ATORVASTATIN, np.minimum(hl_day[a] + rng.integers(0, 91, len(a)), obs_end[a]), 6, 90)
    outside = ctx.outside_persons("drug_exposure")
    day = ctx.outside_day(outside)
    rows.add(outside, drug_concept_id=ATORVASTATIN[0], drug_exposure_start_date=day,
             drug_exposure_end_date=day + 29, days_supply=30, quantity=30.0)
    unmapped = ctx.unmapped_persons("drug_exposure")
    day = ctx.uniform(obs_start[unmapped], obs_end[unmapped])
    rows.add(unmapped, drug_concept_id=0, drug_exposure_start_date=day, drug_exposure_end_date=day + 29,
             days_supply=30, quantity=30.0, drug_source_value="LOCAL-RX-0042")
    frame, _ = rows.build("drug_exposure_id", ctx.ids["drug_exposure"], ctx.first_person_id,
                          "drug_exposure_start_date", ("drug_exposure_start_date", "drug_exposure_end_date"))
    ctx.next_ids("drug_exposure", len(frame))
    source = np.array(frame["drug_source_value"], dtype=object)
    missing = pd.isna(source)
    source[missing] = source_codes(frame["drug_concept_id"].to_numpy()[missing])
    frame["drug_source_value"] = source
    frame["drug_type_concept_id"] = PRESCRIPTION
    return frame


def procedures(ctx: ChunkContext, cases: np.ndarray, hf_day: np.ndarray,
               hf_visit_id: np.ndarray) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Procedures, with the ids and days of the MR procedures behind the linked images."""
    rng, n, pp = ctx.rng, ctx.n, ctx.people
    obs_start, obs_end, index = pp.obs_start, pp.obs_end, pp.index
    rows = RowBlocks()
    e = np.flatnonzero(rng.random(n) < 0.3)
    rows.add(e, procedure_concept_id=ECG, procedure_date=ctx.uniform(obs_start[e], obs_end[e]))
    x = np.flatnonzero(rng.random(n) < 0.1)
    rows.add(x, procedure_concept_id=CHEST_XRAY, procedure_date=ctx.uniform(obs_start[x], obs_end[x]))
    rows.add(cases, procedure_concept_id=ECG, procedure_date=hf_day, visit_occurrence_id=hf_visit_id)
    imaged = np.flatnonzero(pp.linked_image)
    image_day = index[imaged] - rng.integers(1, 91, len(imaged))
    image_at = rows.add(imaged, procedure_concept_id=MRI, procedure_date=image_day)
    frame, rank = rows.build("procedure_occurrence_id", ctx.ids["procedure_occurrence"], ctx.first_person_id,
                             "procedure_date", ("procedure_date",))
    ctx.next_ids("procedure_occurrence", len(frame))
    frame["procedure_type_concept_id"] = EHR
    frame["procedure_source_value"] = source_codes(frame["procedure_concept_id"].to_numpy())
    first = int(frame["procedure_occurrence_id"].iloc[0]) if len(frame) else 0
    image_procedure_ids = first + rank[image_at:image_at + len(imaged)]
    return frame, image_procedure_ids, image_day


def observations(ctx: ChunkContext) -> pd.DataFrame:
    """Current-smoker observations."""
    pp = ctx.people
    obs_start, obs_end = pp.obs_start, pp.obs_end
    rows = RowBlocks()
    s = np.repeat(np.flatnonzero(pp.smoker), ctx.rng.integers(1, 3, int(pp.smoker.sum())))
    rows.add(s, observation_concept_id=SMOKER, observation_date=ctx.uniform(obs_start[s], obs_end[s]),
             observation_source_value="current smoker")
    frame, _ = rows.build("observation_id", ctx.ids["observation"], ctx.first_person_id, "observation_date",
                          ("observation_date",))
    ctx.next_ids("observation", len(frame))
    frame["observation_type_concept_id"] = EHR
    return frame


def add_domain_rows(ctx: ChunkContext, tables: dict[str, pd.DataFrame], stream: tuple[int, int, int]) -> None:
    """Append smoking status (a value concept), a questionnaire score and a unitless lab (issue 13).

    The rows come from their own random stream and are appended after every other row of the chunk
    (ids continue the table's), so the rows generated before this addition are unchanged.  Per person,
    with a share of persons each: smoking status answers (current smokers answer "current", the others
    "former" or "never") on 1-2 days in the observation period; a PHQ-9 score (0-27, no unit); an INR
    (UCUM ``{ratio}``, dimensionless).
    """
    rng = np.random.default_rng([*stream, 13])
    pp, n = ctx.people, ctx.n
    obs_start, obs_end = pp.obs_start, pp.obs_end

    answered = np.flatnonzero(rng.random(n) < 0.8)
    sp = np.repeat(answered, rng.integers(1, 3, len(answered)))
    other = np.where(rng.random(len(sp)) < 0.45, vocab.SMOKING_FORMER, vocab.SMOKING_NEVER)
    answer = np.where(pp.smoker[sp], vocab.SMOKING_CURRENT, other)
    rows = RowBlocks()
    rows.add(sp, observation_concept_id=vocab.SMOKING_STATUS,
             observation_date=uniform_days(rng, obs_start[sp], obs_end[sp]), value_as_concept_id=answer,
             observation_source_value="72166-2")
    scored = np.flatnonzero(rng.random(n) < 0.5)
    qp = np.repeat(scored, rng.integers(1, 4, len(scored)))
    rows.add(qp, observation_concept_id=vocab.PHQ9_SCORE,
             observation_date=uniform_days(rng, obs_start[qp], obs_end[qp]),
             value_as_number=rng.integers(0, 28, len(qp)).astype(np.float64), observation_source_value="44261-6")
    frame, _ = rows.build("observation_id", ctx.ids["observation"], ctx.first_person_id, "observation_date",
                          ("observation_date",))
    ctx.next_ids("observation", len(frame))
    frame["observation_type_concept_id"] = EHR
    tables["observation"] = pd.concat([tables["observation"], frame], ignore_index=True)

    tested = np.flatnonzero(rng.random(n) < 0.4)
    ip = np.repeat(tested, rng.integers(1, 3, len(tested)))
    unit = np.full(len(ip), vocab.RATIO_UNIT)  # a dimensionless UCUM unit (NULL units are a CDM warning)
    labs = RowBlocks()
    labs.add(ip, measurement_concept_id=vocab.INR,
             measurement_date=uniform_days(rng, obs_start[ip], obs_end[ip]),
             value_as_number=np.round(np.clip(rng.normal(1.1, 0.25, len(ip)), 0.7, 4.0), 2), unit_concept_id=unit,
             measurement_source_value="6301-6")
    frame, _ = labs.build("measurement_id", ctx.ids["measurement"], ctx.first_person_id, "measurement_date",
                          ("measurement_date",))
    ctx.next_ids("measurement", len(frame))
    frame["measurement_type_concept_id"] = LAB_TYPE
    tables["measurement"] = pd.concat([tables["measurement"], frame], ignore_index=True)


def deaths(ctx: ChunkContext) -> pd.DataFrame:
    """Deaths on the last observed day of persons whose observation ends before the data does."""
    rng, n, pp = ctx.rng, ctx.n, ctx.people
    obs_end = pp.obs_end
    dies = (obs_end < DATA_END) & (rng.random(n) < sigmoid(-3.2 + 0.06 * (pp.age_index - 60) + 1.0 * pp.outcome))
    d = np.flatnonzero(dies)
    return pd.DataFrame({
        "person_id": ctx.first_person_id + d,
        "death_date": obs_end[d].astype("datetime64[D]"),
        "death_type_concept_id": EHR,
    })
