"""ANN -> SNN conversion: phase neurons, spike sites, Hadamard rotation, calibration and fitting."""
