# Loads the Vagrantfile against a stand-in for Vagrant and prints, as JSON lines, every setting it makes,
# so CI can check the two-VM description on a machine without Vagrant (tests/lab/test_lab_smoke.py).
#   ruby vagrant/check.rb vagrant/Vagrantfile
require "json"

# Answers any chain of calls: `a.b` descends, `a.b = x` and `a.b(x)` record, a block gets a child scope.
class Recorder < BasicObject
  def initialize(scope, out)
    @scope = scope
    @out = out
  end

  def method_missing(name, *args, **kw, &block)
    name = name.to_s
    return ::Recorder.new(@scope + [name], @out) if args.empty? && kw.empty? && block.nil? && !name.end_with?("=")

    @out << { "scope" => @scope, "call" => name, "args" => args, "kw" => kw }
    child = ::Recorder.new(@scope + ["#{name}:#{args.first}"], @out)
    block&.call(child, child)
    child
  end

  def respond_to_missing?(*) = true
end

module Vagrant
  OUT = []
  def self.configure(_version)
    yield Recorder.new([], OUT)
  end
end

load ARGV.fetch(0)
Vagrant::OUT.each { |event| puts JSON.generate(event) }
