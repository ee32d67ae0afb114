"""A small labelled set written for tests: five departments, a dozen short emails each.

Tests of the baseline, the evaluation and the CLI use it instead of the starter data, so they
do not depend on its exact contents.
"""

from __future__ import annotations

from pathlib import Path

from mailrouter.dataset import Dataset, Example

TEMPLATES = {
    "RH": [
        (
            "Candidature {x}",
            "Bonjour, je vous adresse ma candidature pour le poste de {x}. CV joint.",
        ),
        (
            "Stage {x}",
            "Bonjour, je cherche un stage de {x} pour six mois, prenez-vous des stagiaires ?",
        ),
        (
            "Suivi de recrutement",
            "Ou en est ma candidature au poste de {x} ? Merci de votre retour.",
        ),
    ],
    "Support": [
        ("Panne {x}", "Notre {x} ne demarre plus depuis la mise a jour, pouvez-vous nous aider ?"),
        ("Bug {x}", "Le logiciel plante quand on ouvre le module {x}. Message d'erreur 500."),
        ("Livraison", "Le colis contenant le {x} n'est jamais arrive, commande en retard."),
    ],
    "Commercial": [
        ("Demande de devis {x}", "Pourriez-vous nous envoyer un devis pour {x} licences ?"),
        ("Tarifs {x}", "Quels sont vos tarifs pour une commande de {x} ? Nous sommes une PME."),
        ("Partenariat", "Nous aimerions devenir revendeur de vos produits {x}, discutons-en."),
    ],
    "Finance": [
        ("Facture {x}", "Veuillez trouver ci-joint la facture {x}, a regler sous 30 jours."),
        ("Relance paiement", "Sauf erreur de notre part, la facture {x} reste impayee a ce jour."),
        ("Remboursement", "Nous attendons toujours le remboursement de l'avoir {x}."),
    ],
    "SPAM": [
        ("Gagnez {x}", "Felicitations ! Vous avez gagne un {x}, cliquez ici pour le recevoir."),
        ("Offre exclusive {x}", "Derniers jours : -70% sur {x}, offre reservee aux membres."),
        ("Votre compte", "Votre compte {x} sera suspendu, verifiez vos identifiants sur ce lien."),
    ],
}
FILLERS = ["alpha", "comptable", "serveur", "Bordeaux"]


def sample_examples() -> list[Example]:
    """Sixty examples (12 per department), without splits."""
    return [
        Example.new(body.format(x=x), label, subject=subject.format(x=x), source="import")
        for label, templates in TEMPLATES.items()
        for subject, body in templates
        for x in FILLERS
    ]


def write_sample_dataset(path: Path) -> Dataset:
    """The sample set stored at ``path`` with splits assigned by the store."""
    store = Dataset(path)
    store.add(sample_examples())
    return store
