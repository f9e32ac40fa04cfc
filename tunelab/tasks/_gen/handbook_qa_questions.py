"""Question phrasings of handbook-qa: five per fact (split 3/1/1 train/validation/test by a seed-free hash)."""

PHRASINGS: dict[str, list[str]] = {
    "person.start_date": [
        "When did {name} join Quillmark?", "What was {name}'s start date?",
        "On what date did {name} start working at the company?", "Since when has {name} been with Quillmark?",
        "What day did {name} first join the company?"],
    "person.role": [
        "What is {name}'s job title?", "What role does {name} have?", "What does {name} do at Quillmark?",
        "Which position does {name} hold?", "What is the title of {name}?"],
    "person.office": [
        "Which office does {name} work from?", "Where is {name} based?", "In which city's office does {name} work?",
        "What office is {name} located in?", "Where does {name} sit?"],
    "person.extension": [
        "What is {name}'s phone extension?", "Which extension reaches {name}?", "How do I call {name} internally?",
        "What's the internal extension for {name}?", "Which number do I dial to reach {name}?"],
    "person.manager": [
        "Who is {name}'s manager?", "Who does {name} report to?", "Who manages {name}?",
        "Name {name}'s line manager.", "To whom does {name} report?"],
    "product.launch_date": [
        "When was {product} launched?", "What is the launch date of {product}?", "On what date did {product} come out?",
        "When did {product} first go on sale?", "Release date of {product}?"],
    "product.price": [
        "What is the list price of {product} in euros?", "How much does {product} cost?", "What does {product} sell for?",
        "Price of {product}?", "How many euros is {product}?"],
    "product.version": [
        "What is the current version of {product}?", "Which version of {product} is current?",
        "What's the latest {product} release number?", "{product} is on which version now?",
        "Tell me the current {product} version."],
    "product.owner": [
        "Who owns {product}?", "Who is the product owner of {product}?", "Which person is responsible for {product}?",
        "Who is in charge of {product}?", "Name the owner of {product}."],
    "office.opened": [
        "When did the {city} office open?", "In what year was the {city} office opened?",
        "What year did Quillmark open in {city}?", "Since which year has the {city} office existed?",
        "Opening year of the {city} office?"],
    "office.desks": [
        "How many desks does the {city} office have?", "What is the desk count in {city}?",
        "How many workstations are in the {city} office?", "Number of desks at the {city} site?",
        "How big is the {city} office in desks?"],
    "office.manager": [
        "Who manages the {city} office?", "Who is the office manager in {city}?", "Who runs the {city} office?",
        "Name the {city} office manager.", "Which person manages the {city} site?"],
    "office.address": [
        "What is the address of the {city} office?", "Where exactly is the {city} office?",
        "Which street address does the {city} office have?", "Give me the {city} office's address.",
        "Street address of the {city} office?"],
    "benefit.amount": [
        "How much can I claim for {benefit} each year?", "What is the annual {benefit} allowance?",
        "What's the yearly cap on {benefit} claims?", "Up to how many euros per year can be claimed for {benefit}?",
        "What is the {benefit} budget per employee per year?"],
    "benefit.approver": [
        "Who approves {benefit} claims?", "Whose approval does a {benefit} claim need?",
        "Who signs off on {benefit} expenses?", "Which person must approve {benefit} claims?",
        "Who do I ask to approve a {benefit} claim?"],
    "benefit.reset": [
        "When does the {benefit} allowance reset?", "On what date is the {benefit} allowance renewed?",
        "What day does the {benefit} budget start over?", "When is the {benefit} allowance topped up again?",
        "Reset date of the {benefit} allowance?"],
    "leave.days": [
        "How many days of {leave} leave do staff get per year?", "What is the annual {leave} leave entitlement?",
        "How much {leave} leave is there per year, in days?", "How many {leave} leave days can I take each year?",
        "Yearly {leave} leave allowance in days?"],
    "leave.notice": [
        "How many days in advance must {leave} leave be requested?", "What notice is needed for {leave} leave, in days?",
        "How early do I have to request {leave} leave?", "Required notice period for {leave} leave?",
        "How far ahead should {leave} leave be booked?"],
    "leave.carry": [
        "How many unused {leave} leave days can be carried over?", "What is the carry-over limit for {leave} leave?",
        "How many {leave} leave days roll over to next year?", "Can I carry {leave} leave over, and how many days?",
        "Maximum {leave} leave days transferable to the next year?"],
    "system.min_length": [
        "What is the minimum password length for the {system}?", "How long must a {system} password be?",
        "How many characters does a {system} password need at least?", "Minimum characters for {system} passwords?",
        "What's the shortest password the {system} accepts?"],
    "system.rotation": [
        "How often are {system} passwords rotated, in days?", "Every how many days must the {system} password change?",
        "What is the password rotation period of the {system}?", "After how many days does a {system} password expire?",
        "Password expiry for the {system}, in days?"],
    "system.owner": [
        "Who owns the {system}?", "Who is the system owner of the {system}?", "Which person is responsible for the {system}?",
        "Who do I contact about access to the {system}?", "Name the owner of the {system}."],
    "project.start": [
        "When did Project {codename} start?", "What is the start date of Project {codename}?",
        "On what date was Project {codename} kicked off?", "When did work on Project {codename} begin?",
        "Project {codename} began on which date?"],
    "project.budget": [
        "What is the budget of Project {codename}?", "How much money has Project {codename} been given?",
        "What's Project {codename}'s budget in euros?", "How large is the Project {codename} budget?",
        "Budget allocated to Project {codename}?"],
    "project.lead": [
        "Who leads Project {codename}?", "Who is the lead of Project {codename}?", "Who is running Project {codename}?",
        "Which person heads Project {codename}?", "Project {codename} is led by whom?"],
    "project.due": [
        "When is Project {codename} due?", "What is the deadline of Project {codename}?",
        "By what date must Project {codename} be finished?", "When should Project {codename} be delivered?",
        "Due date of Project {codename}?"],
    "event.date": [
        "When was the {event}?", "On what date was the {event} held?", "What date did the {event} take place?",
        "Which day was the {event}?", "The {event} happened on which date?"],
    "event.city": [
        "Where was the {event} held?", "In which city did the {event} take place?", "Where did the {event} happen?",
        "What city hosted the {event}?", "Location of the {event}?"],
    "event.attendees": [
        "How many people attended the {event}?", "How many employees came to the {event}?",
        "What was the attendance at the {event}?", "Number of attendees at the {event}?",
        "How many staff took part in the {event}?"],
}
