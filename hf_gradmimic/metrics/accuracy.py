# Copyright 2025 The hf-gradmimic Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Classification accuracy as a local `evaluate` module, usable offline.

    accuracy = #(prediction_i == reference_i) / N

The hosted `evaluate.load("accuracy")` needs the Hugging Face Hub on first use; this script computes
the same number (unweighted, `normalize=True`) without any download. It is loaded by path through
`evaluate.load`, which copies it into the dynamic-modules cache, so it must stay self-contained (only
library imports).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Accuracy is the proportion of correct predictions among the total number of cases processed:
accuracy = (TP + TN) / (TP + TN + FP + FN) for binary labels, #(prediction == reference) / N in general.
"""

_CITATION = """\
@article{scikit-learn,
  title   = {Scikit-learn: Machine Learning in {P}ython},
  author  = {Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and
             Grisel, O. and Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and
             Vanderplas, J. and Passos, A. and Cournapeau, D. and Brucher, M. and Perrot, M. and
             Duchesnay, E.},
  journal = {Journal of Machine Learning Research},
  volume  = {12},
  pages   = {2825--2830},
  year    = {2011}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): ground-truth class ids.

Returns:
    accuracy (`float`): fraction of predictions equal to their reference, in [0, 1].

Examples:
    >>> metric = evaluate.load("path/to/hf_gradmimic/metrics/accuracy.py")
    >>> metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Fraction of predictions equal to their reference."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    # int64 so that any class id (and transformers' -100 if a caller forgets to mask it)
                    # round-trips through Arrow unchanged.
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
            format="numpy",
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        predictions = np.asarray(predictions).reshape(-1)
        references = np.asarray(references).reshape(-1)
        if predictions.size == 0:
            raise ValueError("accuracy needs at least one prediction.")
        return {"accuracy": float(np.mean(predictions == references))}
