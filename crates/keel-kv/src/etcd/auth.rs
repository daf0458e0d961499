//! etcd's `Auth` service: users, roles, permissions and `Authenticate`, on [`KvApi`]'s auth
//! methods (changes through Raft, reads linearizable).

use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::pb::authpb;
use super::pb::etcdserverpb as rpc;
use super::EtcdService;
use crate::api::ApiError;
use crate::auth::Need;
use crate::auth::PermType;
use crate::auth::Permission;

fn perm_to_pb(p: Permission) -> authpb::Permission {
    use authpb::permission::Type;
    let t = match p.perm_type {
        PermType::Read => Type::Read,
        PermType::Write => Type::Write,
        PermType::ReadWrite => Type::Readwrite,
    };
    authpb::Permission { perm_type: t as i32, key: p.key, range_end: p.range_end }
}

fn perm_of(p: authpb::Permission) -> Result<Permission, ApiError> {
    use authpb::permission::Type;
    let perm_type = match Type::try_from(p.perm_type) {
        Ok(Type::Read) => PermType::Read,
        Ok(Type::Write) => PermType::Write,
        Ok(Type::Readwrite) => PermType::ReadWrite,
        Err(_) => return Err(ApiError::BadRequest(format!("unknown permission type {}", p.perm_type))),
    };
    Ok(Permission { perm_type, key: p.key, range_end: p.range_end })
}

/// A unary auth call: `$req` the request message, `$user` the sender (None: auth is off here).
macro_rules! auth_call {
    ($svc:expr, $request:expr, |$user:ident, $req:ident| $body:expr) => {{
        let svc = $svc;
        let r = async {
            let $user = svc.user_of(&$request)?;
            let $req = $request.into_inner();
            $body
        }
        .await;
        svc.done(r)
    }};
}

#[tonic::async_trait]
impl rpc::auth_server::Auth for EtcdService {
    async fn auth_enable(
        &self,
        request: Request<rpc::AuthEnableRequest>,
    ) -> Result<Response<rpc::AuthEnableResponse>, Status> {
        auth_call!(self, request, |user, _req| {
            let rev = self.api.auth_enable(user.as_ref()).await?;
            Ok(rpc::AuthEnableResponse { header: self.header(rev) })
        })
    }

    async fn auth_disable(
        &self,
        request: Request<rpc::AuthDisableRequest>,
    ) -> Result<Response<rpc::AuthDisableResponse>, Status> {
        auth_call!(self, request, |user, _req| {
            let rev = self.api.auth_disable(user.as_ref()).await?;
            Ok(rpc::AuthDisableResponse { header: self.header(rev) })
        })
    }

    /// Open to anyone, as etcd's (it tells a client whether to authenticate).
    async fn auth_status(
        &self,
        _: Request<rpc::AuthStatusRequest>,
    ) -> Result<Response<rpc::AuthStatusResponse>, Status> {
        let r = self.api.auth_status().await.map(|(rev, s)| rpc::AuthStatusResponse {
            header: self.header(rev),
            enabled: s.enabled,
            auth_revision: s.revision,
        });
        self.done(r)
    }

    async fn authenticate(
        &self,
        request: Request<rpc::AuthenticateRequest>,
    ) -> Result<Response<rpc::AuthenticateResponse>, Status> {
        let req = request.into_inner();
        let r = self
            .api
            .authenticate(&req.name, req.password)
            .await
            .map(|(rev, token)| rpc::AuthenticateResponse { header: self.header(rev), token });
        self.done(r)
    }

    async fn user_add(
        &self,
        request: Request<rpc::AuthUserAddRequest>,
    ) -> Result<Response<rpc::AuthUserAddResponse>, Status> {
        auth_call!(self, request, |user, req| {
            let no_password = req.options.is_some_and(|o| o.no_password);
            let rev = self.api.user_add(user.as_ref(), &req.name, req.password, no_password).await?;
            Ok(rpc::AuthUserAddResponse { header: self.header(rev) })
        })
    }

    /// Root, or a user asking about itself (etcd).
    async fn user_get(
        &self,
        request: Request<rpc::AuthUserGetRequest>,
    ) -> Result<Response<rpc::AuthUserGetResponse>, Status> {
        auth_call!(self, request, |user, req| {
            self.api.authorize_user_get(user.as_ref(), &req.name)?;
            let (rev, roles) = self.api.user_get(&req.name).await?;
            Ok(rpc::AuthUserGetResponse { header: self.header(rev), roles })
        })
    }

    async fn user_list(
        &self,
        request: Request<rpc::AuthUserListRequest>,
    ) -> Result<Response<rpc::AuthUserListResponse>, Status> {
        auth_call!(self, request, |user, _req| {
            self.api.authorize(user.as_ref(), &Need::Root)?;
            let (rev, users) = self.api.user_list().await?;
            Ok(rpc::AuthUserListResponse { header: self.header(rev), users })
        })
    }

    async fn user_delete(
        &self,
        request: Request<rpc::AuthUserDeleteRequest>,
    ) -> Result<Response<rpc::AuthUserDeleteResponse>, Status> {
        auth_call!(self, request, |user, req| {
            let rev = self.api.user_delete(user.as_ref(), &req.name).await?;
            Ok(rpc::AuthUserDeleteResponse { header: self.header(rev) })
        })
    }

    async fn user_change_password(
        &self,
        request: Request<rpc::AuthUserChangePasswordRequest>,
    ) -> Result<Response<rpc::AuthUserChangePasswordResponse>, Status> {
        auth_call!(self, request, |user, req| {
            let rev = self.api.user_change_password(user.as_ref(), &req.name, req.password).await?;
            Ok(rpc::AuthUserChangePasswordResponse { header: self.header(rev) })
        })
    }

    async fn user_grant_role(
        &self,
        request: Request<rpc::AuthUserGrantRoleRequest>,
    ) -> Result<Response<rpc::AuthUserGrantRoleResponse>, Status> {
        auth_call!(self, request, |user, req| {
            let rev = self.api.user_grant_role(user.as_ref(), &req.user, &req.role).await?;
            Ok(rpc::AuthUserGrantRoleResponse { header: self.header(rev) })
        })
    }

    async fn user_revoke_role(
        &self,
        request: Request<rpc::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<rpc::AuthUserRevokeRoleResponse>, Status> {
        auth_call!(self, request, |user, req| {
            let rev = self.api.user_revoke_role(user.as_ref(), &req.name, &req.role).await?;
            Ok(rpc::AuthUserRevokeRoleResponse { header: self.header(rev) })
        })
    }

    async fn role_add(
        &self,
        request: Request<rpc::AuthRoleAddRequest>,
    ) -> Result<Response<rpc::AuthRoleAddResponse>, Status> {
        auth_call!(self, request, |user, req| {
            let rev = self.api.role_add(user.as_ref(), &req.name).await?;
            Ok(rpc::AuthRoleAddResponse { header: self.header(rev) })
        })
    }

    /// Root, or a user holding the role (etcd).
    async fn role_get(
        &self,
        request: Request<rpc::AuthRoleGetRequest>,
    ) -> Result<Response<rpc::AuthRoleGetResponse>, Status> {
        auth_call!(self, request, |user, req| {
            self.api.authorize_role_get(user.as_ref(), &req.role)?;
            let (rev, perms) = self.api.role_get(&req.role).await?;
            Ok(rpc::AuthRoleGetResponse {
                header: self.header(rev),
                perm: perms.into_iter().map(perm_to_pb).collect(),
            })
        })
    }

    async fn role_list(
        &self,
        request: Request<rpc::AuthRoleListRequest>,
    ) -> Result<Response<rpc::AuthRoleListResponse>, Status> {
        auth_call!(self, request, |user, _req| {
            self.api.authorize(user.as_ref(), &Need::Root)?;
            let (rev, roles) = self.api.role_list().await?;
            Ok(rpc::AuthRoleListResponse { header: self.header(rev), roles })
        })
    }

    async fn role_delete(
        &self,
        request: Request<rpc::AuthRoleDeleteRequest>,
    ) -> Result<Response<rpc::AuthRoleDeleteResponse>, Status> {
        auth_call!(self, request, |user, req| {
            let rev = self.api.role_delete(user.as_ref(), &req.role).await?;
            Ok(rpc::AuthRoleDeleteResponse { header: self.header(rev) })
        })
    }

    async fn role_grant_permission(
        &self,
        request: Request<rpc::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<rpc::AuthRoleGrantPermissionResponse>, Status> {
        auth_call!(self, request, |user, req| {
            // etcd answers a grant without a permission with a nil dereference; refuse it plainly.
            let perm = perm_of(req.perm.ok_or(ApiError::BadRequest("permission is not provided".into()))?)?;
            let rev = self.api.role_grant_permission(user.as_ref(), &req.name, perm).await?;
            Ok(rpc::AuthRoleGrantPermissionResponse { header: self.header(rev) })
        })
    }

    async fn role_revoke_permission(
        &self,
        request: Request<rpc::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<rpc::AuthRoleRevokePermissionResponse>, Status> {
        auth_call!(self, request, |user, req| {
            let rev =
                self.api.role_revoke_permission(user.as_ref(), &req.role, req.key, req.range_end).await?;
            Ok(rpc::AuthRoleRevokePermissionResponse { header: self.header(rev) })
        })
    }
}
