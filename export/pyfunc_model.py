"""MLflow pyfunc model, logged as models-from-code: MLflow stores this file, never a pickled object.

Input: a DataFrame with one (user, candidate) pair per row and raw feature values as columns, the shapes
the HTTP API takes (a multi-valued feature as a list; the item id alone when the item store knows the
item; any other feature may be left out); `adsfm.contract.request.request_rows(body)` turns a request body
into such rows. Output: the probability of each row (a multi-task model: [rows, tasks], in the manifest's
task order), the same as HTTP gives (consecutive rows of one user
are scored as one request). Services use adsfm-serve instead; this is for batch scoring with
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
        from adsfm.serving.bundle import open_engine

        self.engine = open_engine(context.artifacts["bundle"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        return self.engine.score_records(model_input.to_dict("records"))


mlflow.models.set_model(AdsfmRankerModel())
