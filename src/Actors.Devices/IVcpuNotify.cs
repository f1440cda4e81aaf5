namespace ActorVmm.Devices;

/// <summary>
/// A message that needs its vcpu now (the seed's vcpu_notify_event): when one is queued for a vcpu
/// actor, the vcpu's mailbox kicks the vcpu thread out of KVM_RUN (KVM api.rst, "immediate_exit"
/// and a signal), so it is handled before the guest runs another instruction it could affect.
/// Messages a vcpu waits for out of the guest (device replies, credits) do not need it.
/// Implemented by the vcpu's requests, the vlapic's events, fault injections and the vmspace's EPT
/// invalidation; the mailbox asks only this.
/// </summary>
public interface IVcpuNotify;
