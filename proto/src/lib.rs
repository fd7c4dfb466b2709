//! Trellis's internal protocols, generated from the `.proto` files beside this crate.
#![deny(unsafe_code)]

pub mod events {
    pub mod v1 {
        tonic::include_proto!("trellis.events.v1");
    }
}

pub mod network {
    pub mod v1 {
        tonic::include_proto!("trellis.network.v1");
    }
}

pub mod service {
    pub mod v1 {
        tonic::include_proto!("trellis.service.v1");
    }
}

pub mod storage {
    pub mod v1 {
        tonic::include_proto!("trellis.storage.v1");
    }
}
