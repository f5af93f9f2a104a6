//! # brighter-macros
//!
//! Derives for brighter requests, re-exported by `brighter-core` (feature
//! `macros`, on by default):
//!
//! - `#[derive(Command)]`: `Request` and `Command`;
//! - `#[derive(Event)]`: `Request` and `Event`;
//! - `#[derive(Request)]`: `Request` alone.
//!
//! The request id is the field named `id` (a `Uuid`), or the field marked
//! `#[brighter(id)]`; the partition key is the field marked
//! `#[brighter(partition_key)]` (anything with `to_string`), none otherwise.
//! A type that also derives `schemars::JsonSchema` gets its schema in the
//! AsyncAPI document (`Request::json_schema`).
//!
//! ```ignore
//! #[derive(Command, Serialize, Deserialize)]
//! struct ReserveStock {
//!     id: Uuid,
//!     #[brighter(partition_key)]
//!     sku: String,
//! }
//! ```

#![forbid(unsafe_code)]

use proc_macro::TokenStream;
use proc_macro2::TokenStream as Tokens;
use quote::quote;
use syn::{Data, DeriveInput, Fields, Ident, parse_macro_input};

/// Implements `Request` and `Command`.
#[proc_macro_derive(Command, attributes(brighter))]
pub fn derive_command(input: TokenStream) -> TokenStream {
    derive(input, Some(quote!(Command)))
}

/// Implements `Request` and `Event`.
#[proc_macro_derive(Event, attributes(brighter))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    derive(input, Some(quote!(Event)))
}

/// Implements `Request` alone.
#[proc_macro_derive(Request, attributes(brighter))]
pub fn derive_request(input: TokenStream) -> TokenStream {
    derive(input, None)
}

fn derive(input: TokenStream, kind: Option<Tokens>) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input, kind) {
        Ok(tokens) => tokens.into(),
        Err(error) => error.to_compile_error().into(),
    }
}

/// Whether `field` carries `#[brighter(<name>)]`.
fn marked(field: &syn::Field, name: &str) -> syn::Result<bool> {
    let mut found = false;
    for attr in field.attrs.iter().filter(|a| a.path().is_ident("brighter")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident(name) {
                found = true;
                Ok(())
            } else if meta.path.is_ident("id") || meta.path.is_ident("partition_key") {
                Ok(())
            } else {
                Err(meta.error("expected `id` or `partition_key`"))
            }
        })?;
    }
    Ok(found)
}

/// The path the generated code names the traits by: the `brighter` facade when
/// the deriving crate depends on it (under whatever name it gave it), else
/// `brighter-core`. Inside either crate itself, `::brighter` or
/// `::brighter_core` (each declares `extern crate self` under its own name).
fn brighter_path() -> Tokens {
    use proc_macro_crate::{FoundCrate, crate_name};
    let named = |name: &str| {
        let ident = Ident::new(name, proc_macro2::Span::call_site());
        quote!(::#ident)
    };
    match crate_name("brighter") {
        Ok(FoundCrate::Name(name)) => return named(&name),
        Ok(FoundCrate::Itself) => return quote!(::brighter),
        Err(_) => {}
    }
    match crate_name("brighter-core") {
        Ok(FoundCrate::Name(name)) => named(&name),
        _ => quote!(::brighter_core),
    }
}

fn expand(input: &DeriveInput, kind: Option<Tokens>) -> syn::Result<Tokens> {
    let name = &input.ident;
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new_spanned(
            name,
            "brighter requests are derived for structs with named fields",
        ));
    };
    let Fields::Named(fields) = &data.fields else {
        return Err(syn::Error::new_spanned(
            name,
            "brighter requests are derived for structs with named fields",
        ));
    };
    let (mut marked_id, mut named_id, mut key): (Option<&Ident>, Option<&Ident>, Option<&Ident>) =
        (None, None, None);
    for field in &fields.named {
        let Some(ident) = field.ident.as_ref() else {
            continue;
        };
        if marked(field, "id")? {
            marked_id = Some(ident);
        }
        if ident == "id" {
            named_id = Some(ident);
        }
        if marked(field, "partition_key")? {
            key = Some(ident);
        }
    }
    let id = marked_id.or(named_id).ok_or_else(|| {
        syn::Error::new_spanned(
            name,
            "a request needs an id: a field named `id` or one marked #[brighter(id)]",
        )
    })?;
    let partition_key = key.map(|key| {
        quote! {
            fn partition_key(&self) -> ::core::option::Option<::std::string::String> {
                ::core::option::Option::Some(::std::string::ToString::to_string(&self.#key))
            }
        }
    });
    let krate = brighter_path();
    let (impl_generics, type_generics, where_clause) = input.generics.split_for_impl();
    let marker = kind.map(|kind| {
        quote! {
            impl #impl_generics #krate::#kind for #name #type_generics #where_clause {}
        }
    });
    Ok(quote! {
        impl #impl_generics #krate::Request for #name #type_generics #where_clause {
            fn id(&self) -> #krate::uuid::Uuid {
                self.#id
            }
            #partition_key
            fn json_schema() -> ::core::option::Option<#krate::__serde_json::Value> {
                #[allow(unused_imports)]
                use #krate::__probe::{HasSchema as _, NoSchema as _};
                // The type's own schema when it derives `JsonSchema`.
                (&#krate::__probe::Probe::<Self>::new()).json_schema()
            }
        }
        #marker
    })
}
