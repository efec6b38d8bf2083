"""The learning layer: verifiable tasks (`tasks`), models (`models`), sampling (`generation`), GRPO maths
(`grpo`), SAPO's training-set construction (`sapo`) and the update step (`trainer`). No networking here."""
