namespace ActorVmm.LibVmm;

/// <summary>
/// The error a user can act on, whatever layer found it: a KVM call or mapping that failed, guest
/// memory that cannot be laid out, host memory that cannot be set up, a bus that cannot be wired,
/// an image that cannot be booted. Building a VM reports each of them as the reason it failed;
/// anything else is a bug.
/// </summary>
public abstract class VmmException(string message, Exception? inner = null) : Exception(message, inner);
