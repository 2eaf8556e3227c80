"""Sample-quality metrics for binarized digits: Frechet digit distance, confidence, diversity.

The Frechet Inception Distance (FID, Heusel et al., 2017, "GANs Trained by a Two
Time-Scale Update Rule Converge to a Local Nash Equilibrium") fits a Gaussian to the
Inception-v3 features of each image set and reports the Frechet (2-Wasserstein)
distance between the two Gaussians::

    d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))

Inception-v3 is trained on 299x299 colour photographs and fits 28x28 binary digits
poorly, so this module uses the same recipe with a small CNN trained on binarized
MNIST (:class:`DigitClassifier`, weights shipped with the package). The result is
called the **Frechet digit distance (FDD)**. It is only comparable between runs that
use the same classifier weights, the same reference set and the same set sizes.
Lower is better, and 0 means identical feature statistics. For scale, take the
shipped weights and the 500 held-out digits as reference. Then the 4,500 train digits
score 11.4 and 500 random train digits 17-19. Blank images, uniform noise or the 450
train digits of any one class score 960-1420 (measured on CPU, torch 2.14).

Two more numbers come from the classifier's predictions on the generated images:

- ``mean_confidence``: the mean over images of the max softmax probability. Clear
  digits score near 1, and blobs between classes score lower. NOTE: like most CNNs the
  classifier is overconfident far from the data (uniform noise scores 1.0), so read
  this number together with the FDD.
- ``class_entropy``: the entropy (nats) of the histogram of predicted classes. A model
  that covers all ten digits evenly scores near ``ln 10 = 2.303``, and a collapsed model
  that draws one digit scores near 0.

The shipped weights are produced by ``scripts/train_classifier.py`` (seeded, trained on
the 4,500-image train split of ``mnist-sample``, never on its 500 held-out digits).

Example:
    >>> from masked_diffusion.data import load_dataset
    >>> from masked_diffusion.metrics import sample_quality
    >>> train = load_dataset("mnist-sample", split="train").images
    >>> heldout = load_dataset("mnist-sample", split="heldout").images
    >>> result = sample_quality(heldout, train)
    >>> result.frechet_digit_distance < 20.0
    True
"""

from __future__ import annotations

import dataclasses
import io
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DigitClassifier",
    "SampleQuality",
    "compute_statistics",
    "frechet_distance",
    "load_digit_classifier",
    "sample_quality",
]

logger = logging.getLogger(__name__)

#: Version of the weights-file layout written by ``scripts/train_classifier.py``.
WEIGHTS_FORMAT_VERSION = 1
#: Name of the architecture stored in the weights file. Loading rejects other names.
ARCHITECTURE = "DigitClassifier-v1"
#: File name of the shipped weights inside ``masked_diffusion/data_files``.
WEIGHTS_FILENAME = "digit_classifier.pt"
#: Image shape the classifier accepts: (channels, height, width).
IMAGE_SHAPE = (1, 28, 28)


class DigitClassifier(nn.Module):
    """Small CNN that classifies binarized 28x28 digits (about 61k parameters).

    Three 3x3 convolution blocks (16, 32, 64 channels, each ReLU then 2x2 max pooling,
    28 -> 14 -> 7 -> 3) feed a 64-unit fully connected layer. Its ReLU output is the
    feature embedding used by the Frechet digit distance, and a last linear layer maps
    it to 10 logits.

    Args:
        feature_dim: Width of the penultimate layer, the embedding returned by
            :meth:`features`. Default: 64. The shipped weights use 64.
        dropout: Dropout probability applied to the embedding before the last layer
            during training. Default: 0.25.

    Example:
        >>> net = DigitClassifier()
        >>> x = torch.zeros(4, 1, 28, 28, dtype=torch.long)
        >>> net(x).shape, net.features(x).shape
        (torch.Size([4, 10]), torch.Size([4, 64]))
    """

    def __init__(self, feature_dim: int = 64, dropout: float = 0.25) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        #: Training metadata from the weights file, set by :func:`load_digit_classifier`.
        self.metadata: dict[str, Any] = {}
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.fc = nn.Linear(64 * 3 * 3, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the penultimate-layer embedding.

        Args:
            x: Images, shape ``(batch, 1, 28, 28)``, any integer, bool or floating dtype
                with values in {0, 1}. They are cast to the dtype of the weights.

        Returns:
            Embedding, shape ``(batch, feature_dim)``, non-negative (after ReLU).
        """
        h = x.to(self.conv1.weight.dtype)
        h = F.max_pool2d(F.relu(self.conv1(h)), 2)  # (B, 16, 14, 14)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (B, 32, 7, 7)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)  # (B, 64, 3, 3)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute class logits, shape ``(batch, 10)``, for images as in :meth:`features`."""
        logits: torch.Tensor = self.head(self.dropout(self.features(x)))
        return logits


@dataclasses.dataclass(frozen=True)
class SampleQuality:
    """Sample-quality scores of a set of generated images against a reference set.

    Attributes:
        frechet_digit_distance: Frechet distance between Gaussians fitted to the
            classifier embeddings of the generated and the reference images (FDD). Lower
            is better. It carries a positive finite-sample bias, so compare values
            computed with the same set sizes.
        mean_confidence: Mean over generated images of the classifier's max softmax
            probability, in [0.1, 1].
        class_entropy: Entropy in nats of the histogram of predicted classes of the
            generated images, in [0, ln 10].
        num_generated: Number of generated images.
        num_reference: Number of reference images.

    Example:
        >>> from masked_diffusion import load_dataset, sample_quality
        >>> heldout = load_dataset("mnist-sample", "heldout").images
        >>> quality = sample_quality(heldout[:250], heldout[250:])
        >>> quality.num_generated, quality.num_reference
        (250, 250)
        >>> sorted(quality.to_dict())  # doctest: +NORMALIZE_WHITESPACE
        ['class_entropy', 'frechet_digit_distance', 'mean_confidence', 'num_generated',
         'num_reference']
    """

    frechet_digit_distance: float
    mean_confidence: float
    class_entropy: float
    num_generated: int
    num_reference: int

    def to_dict(self) -> dict[str, float | int]:
        """Return the fields as a plain dict (for JSON output)."""
        return dataclasses.asdict(self)


def load_digit_classifier(
    device: torch.device | str | None = None, *, path: str | Path | None = None
) -> DigitClassifier:
    """Load a :class:`DigitClassifier` in eval mode, by default with the shipped weights.

    The file is read with ``torch.load(..., weights_only=True)``, which only
    reconstructs tensors and plain containers and never runs pickled code.

    Args:
        device: Device to move the classifier to. Default: ``None`` (CPU).
        path: Weights file written by ``scripts/train_classifier.py``. Default: ``None``,
            the weights shipped in ``masked_diffusion/data_files/digit_classifier.pt``.

    Returns:
        The classifier, in eval mode, with ``requires_grad`` off for every parameter.
        Its ``metadata`` attribute contains the training metadata stored in the file
        (seed, epochs, held-out accuracy).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a digit-classifier weights file of a known format.

    Example:
        >>> classifier = load_digit_classifier()
        >>> classifier.metadata["heldout_accuracy"] > 0.95
        True
    """
    if path is None:
        data = resources.files("masked_diffusion") / "data_files" / WEIGHTS_FILENAME
        payload = torch.load(io.BytesIO(data.read_bytes()), map_location="cpu", weights_only=True)
        source = f"masked_diffusion/data_files/{WEIGHTS_FILENAME}"
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"digit classifier weights not found: {str(path)!r}. Run "
                "scripts/train_classifier.py --output PATH to create them, or pass path=None "
                "for the shipped weights"
            )
        payload = torch.load(path, map_location="cpu", weights_only=True)
        source = str(path)

    state_dict, metadata = _unpack_weights(payload, source)
    classifier = DigitClassifier(feature_dim=int(metadata.get("feature_dim", 64)))
    classifier.load_state_dict(state_dict)
    classifier.metadata = metadata
    classifier.requires_grad_(False)
    classifier.eval()
    if device is not None:
        classifier.to(device)
    logger.debug("loaded digit classifier from %s (metadata %s)", source, metadata)
    return classifier


def frechet_distance(
    mu1: torch.Tensor | np.ndarray,
    sigma1: torch.Tensor | np.ndarray,
    mu2: torch.Tensor | np.ndarray,
    sigma2: torch.Tensor | np.ndarray,
) -> float:
    """Compute the Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``,
    computed in float64. The product ``sigma1 sigma2`` is not symmetric, so its square
    root is not taken directly. Its eigenvalues equal those of the symmetric PSD matrix
    ``sigma1^(1/2) sigma2 sigma1^(1/2)``, so the trace term is the sum of the square
    roots of that matrix's eigenvalues (from ``eigh``, with round-off negatives clipped
    to 0). This needs no ``scipy.linalg.sqrtm`` and never returns complex values.

    Args:
        mu1: Mean of the first Gaussian, shape ``(dim,)``.
        sigma1: Covariance of the first Gaussian, shape ``(dim, dim)``, symmetric PSD.
        mu2: Mean of the second Gaussian, shape ``(dim,)``.
        sigma2: Covariance of the second Gaussian, shape ``(dim, dim)``, symmetric PSD.

    Returns:
        The squared Frechet distance ``d^2`` (the quantity FID reports), a float >= 0.

    Raises:
        ValueError: If the shapes disagree or any value is NaN or infinite.

    Example:
        >>> mu, sigma = torch.zeros(3), torch.eye(3)
        >>> frechet_distance(mu, sigma, mu + 1.0, sigma)
        3.0
    """
    m1 = _as_float64("mu1", mu1)
    m2 = _as_float64("mu2", mu2)
    s1 = _as_float64("sigma1", sigma1)
    s2 = _as_float64("sigma2", sigma2)
    if m1.ndim != 1:
        raise ValueError(f"invalid mu1 shape {tuple(m1.shape)}: expected (dim,)")
    dim = m1.shape[0]
    for name, value, shape in (
        ("mu2", m2, (dim,)),
        ("sigma1", s1, (dim, dim)),
        ("sigma2", s2, (dim, dim)),
    ):
        if tuple(value.shape) != shape:
            raise ValueError(
                f"invalid {name} shape {tuple(value.shape)}: expected {shape} to match "
                f"mu1 of shape ({dim},)"
            )

    # Symmetrize to remove round-off asymmetry before the symmetric eigensolvers.
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    sqrt_s1 = _sqrtm_psd(s1)
    inner = sqrt_s1 @ s2 @ sqrt_s1
    inner_eigenvalues = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0.0)
    trace_sqrt_product = inner_eigenvalues.sqrt().sum()

    diff = m1 - m2
    distance = diff @ diff + torch.trace(s1) + torch.trace(s2) - 2.0 * trace_sqrt_product
    # Round-off can push an exact 0 (identical Gaussians) slightly below 0.
    return max(float(distance), 0.0)


def compute_statistics(
    images: torch.Tensor, classifier: DigitClassifier, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the mean and covariance of the classifier embeddings of ``images``.

    Args:
        images: Binary images, shape ``(N, 1, 28, 28)`` with ``N >= 2``, dtype integer,
            bool or floating with values in {0, 1}.
        classifier: The feature network, e.g. from :func:`load_digit_classifier`. It is
            put in eval mode.
        batch_size: Images per forward pass. Default: 500.

    Returns:
        ``(mu, sigma)``: float64 tensors on the CPU of shape ``(feature_dim,)`` and
        ``(feature_dim, feature_dim)``. ``sigma`` is the unbiased sample covariance.

    Raises:
        TypeError: If ``images`` is not a tensor.
        ValueError: If ``images`` has the wrong shape, fewer than 2 images or values
            other than 0 and 1, or if ``batch_size < 1``.

    Example:
        >>> classifier = load_digit_classifier()
        >>> mu, sigma = compute_statistics(torch.zeros(8, 1, 28, 28), classifier)
        >>> mu.shape, sigma.shape
        (torch.Size([64]), torch.Size([64, 64]))
    """
    _check_images("images", images)
    _check_batch_size(batch_size)
    features, _ = _embed(images, classifier, batch_size)
    mu = features.mean(dim=0)
    sigma = torch.cov(features.T)
    return mu, sigma


def sample_quality(
    generated: torch.Tensor,
    reference: torch.Tensor,
    *,
    classifier: DigitClassifier | None = None,
    batch_size: int = 500,
) -> SampleQuality:
    """Score generated binary digits against reference digits.

    Args:
        generated: Generated images, shape ``(N, 1, 28, 28)`` with ``N >= 2``, dtype
            integer, bool or floating with values in {0, 1} (e.g. the output of
            ``MaskedDiffusionModel.sample``).
        reference: Real images in the same format, e.g. the held-out split of
            ``mnist-sample``.
        classifier: Feature network. Default: ``None``, the shipped weights from
            :func:`load_digit_classifier` on the device of ``generated``.
        batch_size: Images per forward pass. Default: 500.

    Returns:
        A :class:`SampleQuality` with the Frechet digit distance, the mean confidence and
        the class entropy of ``generated``.

    Raises:
        TypeError: If ``generated`` or ``reference`` is not a tensor.
        ValueError: If either has the wrong shape, fewer than 2 images or values other
            than 0 and 1, or if ``batch_size < 1``.

    Example:
        >>> from masked_diffusion.data import load_dataset
        >>> heldout = load_dataset("mnist-sample", split="heldout").images
        >>> blank = torch.zeros(500, 1, 28, 28, dtype=torch.long)
        >>> sample_quality(blank, heldout).class_entropy
        0.0
    """
    _check_images("generated", generated)
    _check_images("reference", reference)
    _check_batch_size(batch_size)
    if classifier is None:
        classifier = load_digit_classifier(generated.device)

    gen_features, gen_logits = _embed(generated, classifier, batch_size)
    ref_features, _ = _embed(reference, classifier, batch_size)
    fdd = frechet_distance(
        gen_features.mean(dim=0),
        torch.cov(gen_features.T),
        ref_features.mean(dim=0),
        torch.cov(ref_features.T),
    )

    probs = torch.softmax(gen_logits, dim=1)
    mean_confidence = float(probs.max(dim=1).values.mean())
    counts = torch.bincount(gen_logits.argmax(dim=1), minlength=10).to(torch.float64)
    class_probs = counts / counts.sum()
    nonzero = class_probs[class_probs > 0]
    class_entropy = float(-(nonzero * nonzero.log()).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0

    if generated.shape[0] < classifier.feature_dim or reference.shape[0] < classifier.feature_dim:
        logger.warning(
            "sample_quality with %d generated and %d reference images: fewer images than "
            "feature dimensions (%d) give a singular covariance and a large, biased Frechet "
            "digit distance; use at least a few hundred images per set",
            generated.shape[0],
            reference.shape[0],
            classifier.feature_dim,
        )
    return SampleQuality(
        frechet_digit_distance=fdd,
        mean_confidence=mean_confidence,
        class_entropy=class_entropy,
        num_generated=int(generated.shape[0]),
        num_reference=int(reference.shape[0]),
    )


def _embed(
    images: torch.Tensor, classifier: DigitClassifier, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return float64 CPU embeddings ``(N, feature_dim)`` and logits ``(N, 10)``."""
    classifier.eval()
    device = next(classifier.parameters()).device
    features, logits = [], []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device)
            h = classifier.features(batch)
            features.append(h.to("cpu", torch.float64))
            logits.append(classifier.head(h).to("cpu", torch.float64))
    return torch.cat(features), torch.cat(logits)


def _check_images(name: str, images: object) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"invalid {name}: expected a torch.Tensor of shape (N, 1, 28, 28), got "
            f"{type(images).__name__}; convert with torch.as_tensor"
        )
    if images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(
            f"invalid {name} shape {tuple(images.shape)}: expected (N, 1, 28, 28); add a "
            f"channel dimension with {name}.unsqueeze(1) if it is missing"
        )
    if images.shape[0] < 2:
        raise ValueError(
            f"invalid {name}: got {images.shape[0]} image(s), expected at least 2 to estimate "
            "a covariance (a few hundred for a stable score)"
        )
    if images.dtype.is_complex:
        raise ValueError(f"invalid {name} dtype {images.dtype}: expected integer, bool or float")
    if images.dtype != torch.bool and not bool(((images == 0) | (images == 1)).all()):
        raise ValueError(
            f"invalid {name}: values must be 0 or 1 (binarized images), got values in "
            f"[{images.min().item()}, {images.max().item()}]; binarize with (x > 0.5).long() "
            "for [0, 1] intensities or (x > 127).long() for uint8 pixels, and sample with "
            "no MASK index left"
        )


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"invalid batch_size={batch_size!r}: expected an int >= 1")


def _as_float64(name: str, value: torch.Tensor | np.ndarray) -> torch.Tensor:
    tensor = torch.as_tensor(value).detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"invalid {name}: contains NaN or infinite values")
    return tensor


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix via ``eigh``, negative eigenvalues clipped."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    root = eigenvalues.clamp(min=0.0).sqrt()
    root_matrix: torch.Tensor = (eigenvectors * root) @ eigenvectors.T
    return root_matrix


def _unpack_weights(payload: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a weights file into its state_dict and metadata, checking its format."""
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise ValueError(
            f"invalid digit classifier weights in {source}: expected a dict with a "
            "'state_dict' entry as written by scripts/train_classifier.py"
        )
    metadata = dict(payload.get("metadata", {}))
    version = metadata.get("format_version")
    architecture = metadata.get("architecture")
    if version != WEIGHTS_FORMAT_VERSION or architecture != ARCHITECTURE:
        raise ValueError(
            f"unsupported digit classifier weights in {source}: format_version={version!r}, "
            f"architecture={architecture!r}; expected {WEIGHTS_FORMAT_VERSION} and "
            f"{ARCHITECTURE!r}. Retrain with scripts/train_classifier.py"
        )
    return payload["state_dict"], metadata
