"""fork-probes: why fine-tuned reasoning models lose coverage, measured at their decision points.

The public API: ``probes.train``, ``probes.run``, ``probes.load_results``, ``probes.figures``,
``probes.demo``, ``probes.sweep``. The ``probes`` command is a thin layer over these.
"""

from probes.api import train  # noqa: F401

try:  # the measuring half lands in stages
    from probes.api import demo, figures, fork_lens, load_results, run, sweep  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__version__ = "0.1.0"
