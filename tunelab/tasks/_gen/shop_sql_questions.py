"""Question families of shop-sql: five phrasings each (split 3/1/1 train/validation/test) and the gold SQL.

Slots: {customer} {product} {country} {category} {order_id} {year} {month} {month_year} {mm}
{tier}/{t} {status}/{s} {dollars}/{cents} {units} {k}. Gold SQL follows one house style: upper-case
keywords, aliases c/p/o/oi in joins, `deleted_at IS NULL` on every soft-deletable table, dollars as
cents / 100.0, sales = status IN ('S', 'D'), years and months matched with LIKE.
"""

from __future__ import annotations

from typing import NamedTuple


class Family(NamedTuple):
    name: str
    phrasings: list[str]
    sql: str


SALES_JOIN = ("FROM order_items oi JOIN orders o ON o.id = oi.order_id JOIN products p ON p.id = oi.product_id "
              "WHERE {where} AND o.status IN ('S', 'D') AND o.deleted_at IS NULL AND p.deleted_at IS NULL")
CUST_JOIN = "FROM orders o JOIN customers c ON c.id = o.customer_id WHERE {where} AND o.deleted_at IS NULL AND c.deleted_at IS NULL"

FAMILIES = [
    Family("count_customers_country", [
        "How many customers are in {country}?", "Count the customers from {country}.",
        "What is the number of customers located in {country}?", "How many of our customers live in {country}?",
        "Give me the customer count for {country}."],
        "SELECT COUNT(*) FROM customers WHERE country = '{country}' AND deleted_at IS NULL;"),
    Family("list_customers_country_tier", [
        "List the names of {tier} customers in {country}.", "Which {tier}-tier customers are based in {country}?",
        "Show the {tier} customers from {country}, by name.", "Who are our {tier} customers in {country}?",
        "Names of customers in {country} with {tier} status?"],
        "SELECT name FROM customers WHERE country = '{country}' AND tier = {t} AND deleted_at IS NULL ORDER BY name;"),
    Family("count_signups_country_year", [
        "How many customers from {country} signed up in {year}?", "Number of {country} customers who joined in {year}?",
        "How many new customers did we get in {country} during {year}?",
        "Count customers in {country} whose account was created in {year}.",
        "In {year}, how many people from {country} registered as customers?"],
        "SELECT COUNT(*) FROM customers WHERE country = '{country}' AND created_at LIKE '{year}-%' AND deleted_at IS NULL;"),
    Family("count_tier_year", [
        "How many {tier} customers signed up in {year}?", "Count the {tier} members who joined in {year}.",
        "Number of customers on the {tier} tier created in {year}?", "How many accounts opened in {year} are {tier} tier?",
        "In {year}, how many {tier} customers registered?"],
        "SELECT COUNT(*) FROM customers WHERE tier = {t} AND created_at LIKE '{year}-%' AND deleted_at IS NULL;"),
    Family("customer_email", [
        "What is the email address of {customer}?", "What's {customer}'s email?", "Find the email for customer {customer}.",
        "Give me the contact email of {customer}.", "Which email address do we have on file for {customer}?"],
        "SELECT email FROM customers WHERE name = '{customer}' AND deleted_at IS NULL;"),
    Family("product_price", [
        "How much does the {product} cost?", "What is the price of the {product}?", "What's the {product} selling for?",
        "Price of {product} in dollars?", "Tell me the current price of the {product}."],
        "SELECT price_cents / 100.0 FROM products WHERE name = '{product}' AND deleted_at IS NULL;"),
    Family("product_sku", [
        "What is the SKU of the {product}?", "Which SKU does {product} have?", "Look up the SKU code for {product}.",
        "Give me the product code (SKU) of the {product}.", "{product}: what's its SKU?"],
        "SELECT sku FROM products WHERE name = '{product}' AND deleted_at IS NULL;"),
    Family("count_products_category", [
        "How many products are in the {category} category?", "How many {category} products do we sell?",
        "Count the items listed under {category}.", "What is the number of products in {category}?",
        "How big is the {category} range, in number of products?"],
        "SELECT COUNT(*) FROM products WHERE category = '{category}' AND deleted_at IS NULL;"),
    Family("priciest_category", [
        "What is the most expensive {category} product?", "Which product in {category} has the highest price?",
        "Name the priciest item in the {category} category.", "Top-priced {category} product?",
        "Which {category} item costs the most?"],
        "SELECT name FROM products WHERE category = '{category}' AND deleted_at IS NULL ORDER BY price_cents DESC LIMIT 1;"),
    Family("cheapest_category", [
        "What is the cheapest {category} product?", "Which product in {category} has the lowest price?",
        "Name the least expensive item in the {category} category.", "Lowest-priced {category} product?",
        "Which {category} item costs the least?"],
        "SELECT name FROM products WHERE category = '{category}' AND deleted_at IS NULL ORDER BY price_cents ASC LIMIT 1;"),
    Family("products_under_price", [
        "Which {category} products cost less than ${dollars}?", "List {category} items priced under ${dollars}.",
        "Show me {category} products cheaper than ${dollars}.", "What can I buy in {category} for under ${dollars}?",
        "Names of {category} products below ${dollars}?"],
        "SELECT name FROM products WHERE category = '{category}' AND price_cents < {cents} AND deleted_at IS NULL ORDER BY name;"),
    Family("avg_price_category", [
        "What is the average price of {category} products?", "Average {category} price in dollars?",
        "On average, how much does a {category} product cost?", "Mean price of items in the {category} category?",
        "What do {category} products cost on average?"],
        "SELECT AVG(price_cents) / 100.0 FROM products WHERE category = '{category}' AND deleted_at IS NULL;"),
    Family("low_stock_category", [
        "Which {category} products have fewer than {units} units in stock?", "List {category} items with stock below {units}.",
        "What {category} products are running low (under {units} in stock)?",
        "Show {category} products whose stock is less than {units}.", "Which items in {category} have under {units} units left?"],
        "SELECT name FROM products WHERE category = '{category}' AND stock < {units} AND deleted_at IS NULL ORDER BY name;"),
    Family("count_orders_status_year", [
        "How many orders placed in {year} were {status}?", "Count the {status} orders from {year}.",
        "Number of {year} orders with status {status}?", "In {year}, how many orders ended up {status}?",
        "How many of the orders made in {year} are {status}?"],
        "SELECT COUNT(*) FROM orders WHERE status = '{s}' AND ordered_at LIKE '{year}-%' AND deleted_at IS NULL;"),
    Family("revenue_month", [
        "What was the total revenue in {month} {month_year}?", "How much did we sell in {month} {month_year}, in dollars?",
        "Revenue for {month} {month_year}?", "Total sales in {month} of {month_year}?",
        "How much money came in from orders in {month} {month_year}?"],
        "SELECT SUM(total_cents) / 100.0 FROM orders WHERE status IN ('S', 'D') AND ordered_at LIKE '{mm}-%' AND deleted_at IS NULL;"),
    Family("status_value_year", [
        "What was the total value of {status} orders in {year}?", "Sum the totals of orders from {year} that are {status}, in dollars.",
        "How much were the {status} orders of {year} worth?", "Dollar value of all {status} orders placed in {year}?",
        "In {year}, what did the {status} orders add up to?"],
        "SELECT SUM(total_cents) / 100.0 FROM orders WHERE status = '{s}' AND ordered_at LIKE '{year}-%' AND deleted_at IS NULL;"),
    Family("customer_order_count", [
        "How many orders has {customer} placed?", "Count the orders made by {customer}.",
        "How many times has {customer} ordered from us?", "Number of orders belonging to {customer}?",
        "What's the order count for {customer}?"],
        "SELECT COUNT(*) " + CUST_JOIN.format(where="c.name = '{customer}'") + ";"),
    Family("customer_spent", [
        "How much has {customer} spent in total?", "What is the total amount {customer} has paid us?",
        "Lifetime spend of {customer} in dollars?", "How much money have we made from {customer}?",
        "Sum up everything {customer} has spent."],
        "SELECT SUM(o.total_cents) / 100.0 " + CUST_JOIN.format(where="c.name = '{customer}' AND o.status IN ('S', 'D')") + ";"),
    Family("customer_last_order", [
        "When did {customer} last place an order?", "What is the date of {customer}'s most recent order?",
        "On what date did {customer} order most recently?", "Latest order date for {customer}?",
        "When was the last order from {customer}?"],
        "SELECT MAX(o.ordered_at) " + CUST_JOIN.format(where="c.name = '{customer}'") + ";"),
    Family("customer_orders_status", [
        "List the ids of {customer}'s {status} orders.", "Which orders by {customer} are {status}? Give the order ids.",
        "Show the order numbers of {customer} with status {status}.", "What are the ids of {status} orders placed by {customer}?",
        "Order ids for {customer} that are currently {status}?"],
        "SELECT o.id " + CUST_JOIN.format(where="c.name = '{customer}' AND o.status = '{s}'") + " ORDER BY o.id;"),
    Family("units_sold_product", [
        "How many units of the {product} have been sold?", "Total quantity sold of {product}?",
        "How many {product} units have we sold so far?", "What is the number of {product} items sold?",
        "Units sold for the {product}?"],
        "SELECT SUM(oi.quantity) " + SALES_JOIN.format(where="p.name = '{product}'") + ";"),
    Family("distinct_buyers_product", [
        "How many different customers have bought the {product}?", "How many distinct buyers does {product} have?",
        "Number of unique customers who purchased {product}?", "How many people have bought {product} at least once?",
        "Count the customers who have purchased the {product}."],
        "SELECT COUNT(DISTINCT o.customer_id) " + SALES_JOIN.format(where="p.name = '{product}'") + ";"),
    Family("orders_country", [
        "How many orders came from customers in {country}?", "Count the orders placed by {country} customers.",
        "Number of orders from {country}?", "How many orders have customers based in {country} made?",
        "What's the total order count for {country}?"],
        "SELECT COUNT(*) " + CUST_JOIN.format(where="c.country = '{country}'") + ";"),
    Family("revenue_country_year", [
        "What was our revenue from {country} in {year}?", "How much did customers in {country} spend in {year}?",
        "Total {year} sales to {country}, in dollars?", "Revenue generated by {country} customers during {year}?",
        "In {year}, how much revenue came from {country}?"],
        "SELECT SUM(o.total_cents) / 100.0 "
        + CUST_JOIN.format(where="c.country = '{country}' AND o.status IN ('S', 'D') AND o.ordered_at LIKE '{year}-%'") + ";"),
    Family("avg_order_tier_year", [
        "What was the average order value for {tier} customers in {year}?",
        "Average amount per order from {tier}-tier customers in {year}?",
        "In {year}, how much did {tier} customers spend per order on average?",
        "Mean order total among {tier} customers in {year}, in dollars?",
        "What was a typical {tier} customer's order worth on average in {year}?"],
        "SELECT AVG(o.total_cents) / 100.0 "
        + CUST_JOIN.format(where="c.tier = {t} AND o.status IN ('S', 'D') AND o.ordered_at LIKE '{year}-%'") + ";"),
    Family("top_products_category", [
        "What are the {k} best-selling {category} products by units sold?", "List the top {k} {category} products by quantity sold.",
        "Which {k} {category} items sold the most units?", "Top {k} sellers in {category}, by units?",
        "Name the {k} {category} products with the highest unit sales."],
        "SELECT p.name " + SALES_JOIN.format(where="p.category = '{category}'")
        + " GROUP BY p.id ORDER BY SUM(oi.quantity) DESC, p.name LIMIT {k};"),
    Family("never_ordered_country", [
        "How many customers in {country} have never placed an order?", "Count {country} customers without any orders.",
        "How many of our {country} customers have not ordered anything yet?",
        "Number of customers from {country} with zero orders?", "How many customers based in {country} have no orders at all?"],
        "SELECT COUNT(*) FROM customers c WHERE c.country = '{country}' AND c.deleted_at IS NULL AND NOT EXISTS "
        "(SELECT 1 FROM orders o WHERE o.customer_id = c.id AND o.deleted_at IS NULL);"),
    Family("products_in_order", [
        "Which products were in order {order_id}?", "What items does order #{order_id} contain?",
        "List the product names on order {order_id}.", "Show what was bought in order number {order_id}.",
        "Products included in order {order_id}?"],
        "SELECT p.name FROM order_items oi JOIN orders o ON o.id = oi.order_id JOIN products p ON p.id = oi.product_id "
        "WHERE o.id = {order_id} AND o.deleted_at IS NULL AND p.deleted_at IS NULL ORDER BY p.name;"),
]
