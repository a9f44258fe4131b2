-- Control plane: every org with its name, billing e-mail, plan and provider account.
SELECT org_id, name, billing_email, plan, provider, provider_customer_id
FROM organizations
ORDER BY org_id
