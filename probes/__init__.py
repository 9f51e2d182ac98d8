"""fork-probes: why fine-tuned reasoning models lose coverage, measured at their decision points.

The public API: ``probes.train``, ``probes.run``, ``probes.load_results``, ``probes.figures``,
``probes.demo``, ``probes.sweep``, ``probes.fork_lens``. The ``probes`` command is a thin layer
over these. No submodule shares a public function's name, so importing one (``probes.runner``,
``probes.grid``) never rebinds ``probes.run`` or ``probes.sweep``.
"""

from probes.api import demo, figures, find_forks, fork_lens, interpolate, load_results, run, sweep, train  # noqa: F401

__version__ = "0.1.0"
