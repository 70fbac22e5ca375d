"""The concept ids the synthetic generator writes, and their source values (vocabulary codes).

Part of the synthetic generator (:mod:`omopfl.synth`); every concept is in :mod:`omopfl.vocab`'s subset.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from omopfl import vocab

EHR, LAB_TYPE, PRESCRIPTION = 32817, 32856, 32838
MALE, FEMALE = 8507, 8532
T2DM_CODES = np.array([201826, 443732, 45757363, 376065, 443729])
T2DM_CODE_P = np.array([0.7, 0.12, 0.06, 0.06, 0.06])
HF_CODES = np.array([316139, 319835, 443580, 439846])
HF_CODE_P = np.array([0.4, 0.4, 0.1, 0.1])
HYPERTENSION, HYPERLIPIDEMIA, OBESITY, CKD, CKD5 = 320128, 432867, 433736, 46271022, 443611
AMI, T1DM, DIABETES_UNSPECIFIED, TACHYCARDIA = 312327, 201254, 201820, 444070
METFORMIN = (40163924, 1503297)  # (clinical drug, ingredient)
LISINOPRIL = (2000000001, 1308216)
ATORVASTATIN = (1545959, 1545958)
INSULIN_GLARGINE = (2000000002, 1502905)
MRI, ECG, CHEST_XRAY = 4013636, 4163951, 4163872
BLOOD_SPECIMEN = 4001225
SMOKER = 903654

#: concept id -> its vocabulary code (the generator's source values)
CONCEPT_CODES: dict[int, str] = {c.concept_id: c.code for c in vocab.CONCEPTS}


def source_codes(concepts: np.ndarray) -> np.ndarray:
    """Source values (vocabulary codes) of concept ids."""
    return pd.Series(concepts).map(CONCEPT_CODES).to_numpy(dtype=object)
