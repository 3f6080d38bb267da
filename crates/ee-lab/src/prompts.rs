//! The fixed, varied prompts of the traffic experiments: the victim's
//! chats, and a disjoint set the attacker samples its prior with (it knows
//! the public model, not what the victim asks).

/// What the victim asks, in turn.
pub const VICTIM: [&str; 24] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child in two sentences.",
    "List three prime numbers greater than 100.",
    "How do I reverse a list in Python?",
    "Give me a recipe for pancakes.",
    "What causes the seasons on Earth?",
    "Summarize the plot of Romeo and Juliet.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Write a short email asking for a day off.",
    "What are the benefits of regular exercise?",
    "Explain what a neural network is.",
    "Suggest a name for a coffee shop.",
    "How many legs does a spider have?",
    "Write a limerick about a cat.",
    "What is the difference between weather and climate?",
    "Give three tips for a job interview.",
    "Describe the water cycle.",
    "What is 15 multiplied by 12?",
    "Tell me a fun fact about octopuses.",
    "How does a bicycle stay upright?",
    "Write a two-line poem about autumn.",
    "What should I pack for a weekend hike?",
];

/// What the attacker asks the public model to learn its statistics.
pub const ATTACKER: [&str; 24] = [
    "Tell me about the history of Rome.",
    "What is machine learning?",
    "Write a story about a dragon.",
    "How do vaccines work?",
    "Describe your ideal vacation.",
    "What are some healthy breakfast ideas?",
    "Explain gravity simply.",
    "Write a poem about the moon.",
    "How do I make a cup of tea?",
    "What is the largest ocean?",
    "Give advice for learning a new language.",
    "What is a black hole?",
    "Write a thank-you note to a teacher.",
    "How do plants grow?",
    "What are the planets in the solar system?",
    "Explain how the internet works.",
    "Write a joke about computers.",
    "What is democracy?",
    "How can I sleep better?",
    "Describe a sunset.",
    "What is the tallest mountain?",
    "How do airplanes fly?",
    "Give me a workout plan for beginners.",
    "What do bees do?",
];
