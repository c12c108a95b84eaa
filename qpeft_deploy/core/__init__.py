"""The method: circuits, Taylor frames, the spectrum, angle quantisation, the adapted layer and PEFT-style attach
(torch only; imports nothing else of the package but errors)."""
