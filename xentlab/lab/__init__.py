"""The lab: everything that trains and reports on top of the loss library (`xentlab.functional`,
`xentlab.kernels`, `xentlab.losses`, `xentlab.testing`). It imports the library, never the reverse."""
