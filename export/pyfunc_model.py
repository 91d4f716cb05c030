"""MLflow pyfunc model, logged as models-from-code: MLflow stores this file, never a pickled object.

Input: a DataFrame with one (user, candidate) pair per row and raw feature values as columns;
output: the probability for each row. Services use adsfm-serve instead; this is for batch scoring with
`mlflow.pyfunc.load_model("models:/NAME@champion").predict(df)`.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class AdsfmRankerModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from serving.bundle import open_ranker

        self.ranker = open_ranker(context.artifacts["bundle"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        return self.ranker.score_records(model_input.to_dict("records"))


mlflow.models.set_model(AdsfmRankerModel())
