"""`iwarp cam`: a camera (or a file) through the animator into a virtual camera, a window or a
file. Modules: `capture`, `frames`, `local` / `remote` engines, `sinks`, `controls`, `app`;
see README.md in this folder. Nothing is imported here, so `import iwarp.cam.x` stays light."""
